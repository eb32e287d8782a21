"""Why prompts work: the attention analysis and prompt-as-bias ablation of a finished run.

    python experiments/analyse_prompts.py --run-id <run id> --tracking-uri sqlite:///mlflow.db
    python experiments/analyse_prompts.py --run-id <run id> --split val --max-images 500 --towers vision
    python experiments/analyse_prompts.py --run-id <run id> data.root=/elsewhere/data train.device=cpu

For a run of a method that puts prompts into the blocks (IVLP, MaPLe, PromptSRC, PromptKD): per
block and tower, how much attention the [cls]/EOT query puts on the prompts, the norm of the
prompt-value term against the token term, and how input-dependent it is; then the model's
accuracy with each block's prompt contribution replaced by its dataset mean (a fixed bias), by
nothing, or with only the prompt keys kept, next to zero-shot and the unablated model. Tables and
plots are logged to the run under ``analysis/``. What it does: ``vlprompt/orchestrator/prompt_analysis.py``;
the maths: ``vlprompt/methods/attention.py``.
"""

from __future__ import annotations

import sys

from vlprompt.orchestrator.prompt_analysis import main

if __name__ == "__main__":
    sys.exit(main())
