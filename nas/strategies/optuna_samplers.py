"""Optuna's samplers as strategies, through Optuna's ask/tell interface.

Each space dimension becomes a `CategoricalDistribution`; the sampler works on an in-memory
study private to the strategy (the run's own store is separate, see `nas.store`). TPE handles
one or several objectives (MOTPE); NSGA-II is Optuna's multi-objective genetic algorithm. The
constraint violation reaches both samplers through ``constraints_func``.

Failed and rejected trials reach the samplers as *infeasible* complete trials, not as Optuna's
FAIL (which every sampler ignores, so a space that fails a lot made both random search):
losses `FAILED_LOSS` (never read: infeasible trials are ranked by violation alone) and a
violation of at least `FAILED_VIOLATION`. So they count toward TPE's ``n_startup_trials`` and
NSGA-II's generations, NSGA-II's constrained domination ranks them after every feasible trial,
and TPE puts them among the "bad" trials whose density it divides by. TPE would also fill its
"good" group with the least-violating infeasible trials when fewer than gamma(n) trials are
feasible, i.e. model failures as good; `TPEStrategy` caps gamma(n) at the number of feasible
trials so only trials that ran and met the constraints are ever "good" (c-TPE, Watanabe & Hutter
2023, argues the same split).

Determinism and resume: the sampler is re-created before every ask with a seed derived from
(seed, number of sampler trials), so the sequence depends only on the seed and the history — which is
exactly what `state_dict` stores.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from search_spaces import Genotype, SearchSpace

from .base import Observation, Strategy, _keyword_defaults, register_strategy

__all__ = ["FAILED_LOSS", "FAILED_VIOLATION", "NSGA2Strategy", "OptunaStrategy", "TPEStrategy"]

FAILED_LOSS = 1e12  # a failed trial's losses for Optuna: finite (Optuna refuses NaN), never read
FAILED_VIOLATION = 1.0  # the least violation a failed trial gets (a crash has none of its own)


def _violation(trial: Any) -> list[float]:
    return [float(trial.user_attrs.get("violation", 0.0))]


def _optuna_violation(losses: Any, violation: float) -> float:
    """A rejected trial keeps its violation (the store's, comparable to a finished one's); a
    crash, which has none, gets `FAILED_VIOLATION`."""
    return float(violation) if losses is not None else max(float(violation), FAILED_VIOLATION)


class OptunaStrategy(Strategy):
    """Base for strategies backed by an Optuna sampler; subclasses build the sampler."""

    def __init__(self, space: SearchSpace, n_objectives: int = 1, seed: int = 0, **sampler_params: Any):
        super().__init__(space, n_objectives, seed)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self.sampler_params = sampler_params
        self._distributions = {
            d.name: optuna.distributions.CategoricalDistribution(d.choices) for d in space.dims
        }
        self._pending: dict[str, list[Any]] = {}  # genotype string -> open optuna trials
        self._new_study()

    # the Optuna sampler class (by name) and our defaults for its options
    sampler_name: str = ""
    sampler_defaults: dict[str, Any] = {}

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The sampler's own keyword options (seed and constraints are ours to set)."""
        import optuna

        sampler = getattr(optuna.samplers, cls.sampler_name)
        found = _keyword_defaults(sampler.__init__, skip=("self", "seed", "constraints_func"))
        return {**found, **cls.sampler_defaults}

    def _make_sampler(self, seed: int) -> Any:
        sampler = getattr(self._optuna.samplers, self.sampler_name)
        params = self._sampler_kwargs({**self.sampler_defaults, **self.sampler_params})
        with warnings.catch_warnings():
            # Optuna 5 deprecates `constraints_func` (removal planned for 7) in favour of
            # `Trial.set_constraint`, which Optuna 4 lacks; this works on both
            warnings.simplefilter("ignore", FutureWarning)
            return sampler(seed=seed % 2**32, constraints_func=_violation, **params)

    def _new_study(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.study = self._optuna.create_study(
                directions=["minimize"] * self.n_objectives, sampler=self._make_sampler(self.seed)
            )

    def _ask_trial(self) -> tuple[Any, Genotype]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature warnings of multivariate TPE
            n_trials = len(self.study.get_trials(deepcopy=False))  # grows with redraws too
            self.study.sampler = self._make_sampler(self.seed * 1_000_003 + n_trials)
            trial = self.study.ask()
            values = {d.name: trial.suggest_categorical(d.name, d.choices) for d in self.space.dims}
        return trial, self.space.from_dims(values)

    def _propose(self) -> Genotype:
        return self._ask_trial()[1]  # unused: `ask` is overridden to keep the trial

    def ask(self) -> Genotype:
        seen = set(self.asked)
        for attempt in range(self.max_redraws + 1):
            trial, g = self._ask_trial()
            if g.to_str() not in seen or attempt == self.max_redraws:
                break
            # a repeat of an evaluated genotype: close it so the sampler moves on
            self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
        self._pending.setdefault(g.to_str(), []).append(trial)
        self.asked.append(g.to_str())
        return g

    def _sampler_kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        """The sampler's keyword arguments for this ask (a hook for `TPEStrategy`)."""
        return params

    def _observe(self, obs: Observation) -> None:
        g, losses, violation = obs
        values = [FAILED_LOSS] * self.n_objectives if losses is None else list(losses)
        trials = self._pending.get(g.to_str())
        if trials:
            trial = trials.pop(0)
            if not trials:
                del self._pending[g.to_str()]
            trial.set_user_attr("violation", _optuna_violation(losses, violation))
            if losses is None:
                trial.set_user_attr("failed", True)
            self.study.tell(trial, values=values)  # infeasible if failed: see the module docstring
            return
        # a result the sampler did not ask for (re-run after resume): add it as data
        self.study.add_trial(self._frozen(g, losses, violation))

    def _frozen(self, g: Genotype, losses: Any, violation: float) -> Any:
        opt = self._optuna
        v = _optuna_violation(losses, violation)
        return opt.trial.create_trial(
            state=opt.trial.TrialState.COMPLETE,
            values=[FAILED_LOSS] * self.n_objectives if losses is None else list(losses),
            params=self.space.to_dims(g),
            distributions=self._distributions,
            user_attrs={"violation": v, **({"failed": True} if losses is None else {})},
            # what the sampler's constraints_func would have stored, had it seen the trial end
            system_attrs={"constraints": (v,)},
        )

    def n_feasible(self) -> int:
        """Sampler trials that ran and met the constraints."""
        complete = self._optuna.trial.TrialState.COMPLETE
        return sum(
            t.state == complete
            and not t.user_attrs.get("failed")
            and not t.user_attrs.get("violation", 0.0) > 0
            for t in self.study.get_trials(deepcopy=False)
        )

    def _extra_state(self) -> dict[str, Any]:
        # Every finished sampler trial in order (discarded redraws too, so trial ids match and
        # NSGA-II's parent cache, keyed by trial id, stays valid); pending ones are re-run and
        # re-told by the controller on resume.
        opt = self._optuna
        trials = self.study.get_trials(deepcopy=False)
        finished = [
            t for t in trials if t.state in (opt.trial.TrialState.COMPLETE, opt.trial.TrialState.FAIL)
        ]
        exact = len(finished) == len(trials)
        study_attrs = self.study._storage.get_study_system_attrs(self.study._study_id) if exact else {}
        return {
            "optuna_trials": [
                {
                    "params": t.params,
                    "values": t.values if t.state == opt.trial.TrialState.COMPLETE else None,
                    "user_attrs": t.user_attrs,
                    "system_attrs": {k: v for k, v in t.system_attrs.items() if _jsonable(v)},
                }
                for t in finished
            ],
            "optuna_study_attrs": {k: v for k, v in study_attrs.items() if _jsonable(v)},
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        opt = self._optuna
        self._new_study()
        self._pending = {}
        for rec in state["optuna_trials"]:
            failed = rec["values"] is None
            self.study.add_trial(
                opt.trial.create_trial(
                    state=opt.trial.TrialState.FAIL if failed else opt.trial.TrialState.COMPLETE,
                    values=rec["values"],
                    params=rec["params"],
                    distributions={k: self._distributions[k] for k in rec["params"]},
                    user_attrs=rec["user_attrs"],
                    system_attrs=rec["system_attrs"],
                )
            )
        for key, value in state["optuna_study_attrs"].items():
            self.study._storage.set_study_system_attr(self.study._study_id, key, value)


def _jsonable(v: Any) -> bool:
    return isinstance(v, int | float | str | bool | list | tuple | dict | None)


@register_strategy
class TPEStrategy(OptunaStrategy):
    name = "tpe"
    description = "Optuna's Tree-structured Parzen Estimator (multivariate; MOTPE for several objectives)"
    sampler_name = "TPESampler"
    sampler_defaults = {"n_startup_trials": 10, "multivariate": True}

    def _sampler_kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        # gamma(n) trials form TPE's "good" group; never more than the feasible ones
        base = params.get("gamma") or (_default_gamma if self.n_objectives == 1 else _default_gamma_mo)
        study = getattr(self, "study", None)  # None while the first study is created
        n_ok = self.n_feasible() if study is not None else 0
        return {**params, "gamma": lambda n: min(base(n), n_ok)}


def _default_gamma(n: int) -> int:  # Optuna's `default_gamma`
    return min(math.ceil(0.1 * n), 25)


def _default_gamma_mo(n: int) -> int:  # Optuna's `default_gamma_multiobjective`
    return math.ceil(0.1 * n)


@register_strategy
class NSGA2Strategy(OptunaStrategy):
    name = "nsga2"
    description = "Optuna's NSGA-II multi-objective genetic algorithm"
    sampler_name = "NSGAIISampler"
    sampler_defaults = {"population_size": 20}
