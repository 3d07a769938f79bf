"""Search: strategies, the controller, the run store, evaluators, runners, cost model, data sets.

Importing `nas` is light: torch, Ray, XGBoost, Optuna and ONNX Runtime are imported inside the
functions that need them.
"""

from .config import SearchConfig
from .controller import SearchController
from .objectives import Constraint, Objective, parse_constraints, parse_objectives
from .pareto import crowding_distance, nondominated_rank, pareto_mask
from .search import SearchRun, open_store, prepare_run, run_search
from .store import RunStore
from .strategies.base import Strategy, list_strategies, make_strategy, register_strategy
from .training import TrainingEvaluator
from .trial import Candidate, Evaluator, StopTrial, TrialResult, run_trial

__all__ = [
    "Candidate",
    "Constraint",
    "Evaluator",
    "Objective",
    "RunStore",
    "SearchConfig",
    "SearchController",
    "SearchRun",
    "StopTrial",
    "Strategy",
    "TrainingEvaluator",
    "TrialResult",
    "crowding_distance",
    "list_strategies",
    "make_strategy",
    "nondominated_rank",
    "open_store",
    "pareto_mask",
    "parse_constraints",
    "parse_objectives",
    "prepare_run",
    "register_strategy",
    "run_search",
    "run_trial",
]
