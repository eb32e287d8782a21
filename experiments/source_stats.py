"""Make the offline source statistics a test-time method aligns to (PromptAlign), for a run's config.

    python experiments/source_stats.py --config promptalign data.root=/data \\
        method.init_state=/runs/maple/learned_state.pt
    python experiments/benchmark.py --config promptalign data.root=/data \\
        method.init_state=/runs/maple/learned_state.pt method.source_stats=<the path it printed>

Give it the same preset and overrides as the run: the statistics are made by exactly the model the
run starts from (backbone, prompts, aligned blocks), from the proxy dataset the method's options
name (``method.source_dataset``, default ImageNet's train split), under the test transform. The
file is written to ``method.source_stats`` when the config names one, else under ``--out-dir``
(default ``source_stats/``) keyed by the model's fingerprint; an up-to-date file is kept. The last
line printed is the override the run needs. A bad config is one line on stderr and exit status 2,
before torch is imported. What it does: ``vlprompt/orchestrator/source_stats.py``.
"""

from __future__ import annotations

import sys

from vlprompt.orchestrator.source_stats import main

if __name__ == "__main__":
    sys.exit(main())
