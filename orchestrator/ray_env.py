"""What every process of a Ray the sweep starts itself must know: which Ray it belongs to.

Ray's state API, called inside Ray's own actors (Ray Train's ``PlacementGroupCleaner`` asks it
whether a Train controller is still alive), finds "its" cluster by scanning the machine for GCS
processes when ``RAY_ADDRESS`` is unset. On a machine running more than one Ray (a laptop with a
dev cluster, a CI box, a shared workstation) that raises "Found multiple active Ray instances",
the cleaner never frees the placement group of a controller that died, and the retried trial
waits for resources forever. :func:`pin_ray_address` runs at the start of every worker process
(``runtime_env.worker_process_setup_hook``) and sets ``RAY_ADDRESS`` to the worker's own GCS.
Kept free of heavy imports: it runs in every worker.
"""

from __future__ import annotations

import os

#: The runtime-env entry of a Ray started by the sweep (``sweep.connect_ray``).
SETUP_HOOK = "vlprompt.orchestrator.ray_env.pin_ray_address"


def pin_ray_address() -> None:
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
