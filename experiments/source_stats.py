"""Make the offline source statistics a test-time method aligns to (PromptAlign, PromptSync).

    python experiments/source_stats.py --config promptalign data.root=/data \\
        method.init_state=/runs/maple/learned_state.pt
    python experiments/benchmark.py --config promptalign data.root=/data \\
        method.init_state=/runs/maple/learned_state.pt method.source_stats=<the path it printed>

    # a folder of images per class name as the source, summed as a Ray Data job
    python experiments/source_stats.py --config promptsync data.root=/data \\
        method.init_state=... method.source_folder=/data/proxy --ray

Give it the same preset and overrides as the run: the statistics are made by exactly the model the
run starts from (backbone, prompts, aligned blocks), from the proxy source the method's options
name -- a catalog dataset (``method.source_dataset``, default ImageNet's train split) or a folder
``<folder>/<class name>/<image>`` (``method.source_folder``) -- under the test transform. The
file is written to ``method.source_stats`` when the config names one, else under ``--out-dir``
(default ``source_stats/``) keyed by the model's fingerprint; an up-to-date file is kept. The last
line printed is the override the run needs. ``--ray`` sums the images on a Ray Data actor pool
(``$RAY_ADDRESS``'s cluster, else a local Ray for the job; the default when ``RAY_ADDRESS`` is set),
``--no-ray`` in this process; the file is the same. A bad config is one line on stderr and exit
status 2, before torch is imported; an unreadable image is one line naming it and exit status 1.
What it does: ``vlprompt/orchestrator/source_stats.py``.
"""

from __future__ import annotations

import sys

from vlprompt.orchestrator.source_stats import main

if __name__ == "__main__":
    sys.exit(main())
