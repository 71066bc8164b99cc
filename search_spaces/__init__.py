"""Search spaces for Block-KD: Hydra-composable YAML (``conf/search/*.yaml``) and the define-by-run
function that turns one into Optuna suggestions (``space.suggest``)."""
from .space import SearchSpaceError, defaults, partitions, suggest

__all__ = ["SearchSpaceError", "defaults", "partitions", "suggest"]
