"""The large-batch study: the same model trained at several batch sizes with MSGD, LARS and
SNGM, each optimizer's learning rate tuned per batch size on a validation split.

Run it with `sngm-study` (or `python -m sngm_integrations.study`), or from Python:

    from sngm_integrations.study import preset, run_study

    result = run_study(preset("quick"), "study_out/quick")
    print(result.table)

Needs the `study` extra (matplotlib, timm, tqdm); they are imported only when used.
"""

from sngm_integrations.study.config import (
    DEFAULT_LR_CENTERS,
    DEFAULT_LR_SCALING,
    PRESETS,
    RunConfig,
    StudyConfig,
    preset,
    run_key,
)
from sngm_integrations.study.runner import StudyResult, run_study

__all__ = [
    "DEFAULT_LR_CENTERS",
    "DEFAULT_LR_SCALING",
    "PRESETS",
    "RunConfig",
    "StudyConfig",
    "StudyResult",
    "preset",
    "run_key",
    "run_study",
]
