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

Left to themselves the samplers learn "avoid failures" slowly: TPE's "bad" density is a product
kernel, nearly a nearest-neighbour estimate in a categorical space, so it cannot tell that *any*
cell holding a failing op fails, and NSGA-II's mutation redraws a decision uniformly whatever
failed. On NAS-Bench-201 with 81% of the space failing they asked 55% and 61% failing
candidates, random 84% (results/search_nb201_fail.md). So once some trials have failed and some
have run, every proposal passes a feasibility gate, the rule `SurrogateGuided` applies to its
pool: a proposal to which `FeasibilityModel` (fitted on the history at each ask) gives a chance
of running below ``min_feasible`` (default 0.5, the surrogate's) is closed as a FAIL trial, which
every sampler ignores, as a repeat already was, and the sampler is asked again. After
`max_refused` refusals (a sampler that has converged on points expected to fail), the ask is a
uniform sample of the space that clears the gate, as samplers fall back to random sampling
(or else the likeliest to run of all drawn), handed to the study with `Study.enqueue_trial`.
This is the probability-of-feasibility of constrained Bayesian optimisation (Gardner et al.
2014) used as a filter, since a sampler's acquisition cannot be multiplied by it from outside.
The gate does nothing until a trial has failed, so a run without failures asks exactly what it
asked before; ``min_feasible=0`` turns it off.

Determinism and resume: the sampler is re-created before every ask with a seed derived from
(seed, number of sampler trials), so the sequence depends only on the seed and the history (and,
for the gate's uniform fallback, the strategy's generator) — which is exactly what `state_dict`
stores; the feasibility model is refitted from the history.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np

from search_spaces import Genotype, SearchSpace

from .base import Observation, Strategy, _keyword_defaults, register_strategy

__all__ = [
    "FAILED_LOSS",
    "FAILED_VIOLATION",
    "FeasibilityModel",
    "NSGA2Strategy",
    "OptunaStrategy",
    "TPEStrategy",
]

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

    def __init__(
        self,
        space: SearchSpace,
        n_objectives: int = 1,
        seed: int = 0,
        min_feasible: float = 0.5,
        **sampler_params: Any,
    ):
        super().__init__(space, n_objectives, seed)
        if not 0 <= min_feasible <= 1:
            raise ValueError(f"need 0 <= min_feasible <= 1, got {min_feasible}")
        self.min_feasible = float(min_feasible)
        self._feasibility: tuple[int, FeasibilityModel | None] = (-1, None)  # (history length, model)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self.sampler_params = sampler_params
        self._distributions = {
            d.name: optuna.distributions.CategoricalDistribution(d.choices) for d in space.dims
        }
        self._pending: dict[str, list[Any]] = {}  # genotype string -> open optuna trials
        self._new_study()

    # sampler draws the feasibility gate may turn down in one ask before `_fallback`: each is a
    # FAIL trial kept in the study (and `state_dict`), and a sampler that has converged on points
    # expected to fail seldom draws a better one later
    max_refused: ClassVar[int] = 10

    # the Optuna sampler class (by name) and our defaults for its options
    sampler_name: str = ""
    sampler_defaults: dict[str, Any] = {}

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The sampler's own keyword options (seed and constraints are ours to set)."""
        import optuna

        sampler = getattr(optuna.samplers, cls.sampler_name)
        found = _keyword_defaults(sampler.__init__, skip=("self", "seed", "constraints_func"))
        return {**found, **cls.sampler_defaults, "min_feasible": 0.5}

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
        model = self.feasibility_model()
        refused: list[tuple[float, Genotype]] = []  # new draws the gate turned down, p_run first
        accepted = None
        for _ in range(self.max_redraws):
            trial, g = self._ask_trial()
            if g.to_str() not in seen:
                p_run = 1.0 if model is None else model.p_run(g)
                if p_run >= self.min_feasible:
                    accepted = trial, g
                    break
                refused.append((p_run, g))
            # a repeat of an evaluated genotype, or one the model expects to fail: close it (every
            # sampler ignores FAIL trials) so the sampler moves on
            self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
            if len(refused) == self.max_refused:
                break
        if accepted is None:
            # the sampler drew nothing new that clears the gate (it has converged on a few
            # points, mostly expected to fail): see `_fallback`; without a model (nothing has
            # failed), one more draw as it comes, as before the gate
            best = max(refused, default=None, key=lambda r: r[0])  # the first of equals: deterministic
            pick = None if model is None else self._fallback(seen, model, best)
            if pick is not None:
                self.study.enqueue_trial(self.space.to_dims(pick))
            accepted = self._ask_trial()
        trial, g = accepted
        self._pending.setdefault(g.to_str(), []).append(trial)
        self.asked.append(g.to_str())
        return g

    def _fallback(
        self, seen: set[str], model: FeasibilityModel, best: tuple[float, Genotype] | None
    ) -> Genotype | None:
        """A uniform sample of the space, new and expected to run, as the samplers themselves
        fall back to random sampling when their model has nothing to propose; if none of
        `max_redraws` samples clears the gate, the likeliest to run of everything drawn."""
        for _ in range(self.max_redraws):
            g = self.space.sample(self.rng)  # the strategy's generator: in `state_dict`
            if g.to_str() in seen:
                continue
            p_run = model.p_run(g)
            if p_run >= self.min_feasible:
                return g
            if best is None or p_run > best[0]:
                best = (p_run, g)
        return None if best is None else best[1]

    def feasibility_model(self) -> FeasibilityModel | None:
        """The model of which proposals run, fitted on the history; None (no gate) while the
        history holds no failure, or nothing that ran, or the gate is off."""
        if self._feasibility[0] != len(self.history):
            failed = [y is None for _, y, _ in self.history]
            model = None
            if self.min_feasible > 0 and any(failed) and not all(failed):
                model = FeasibilityModel(self.space).fit([g for g, _, _ in self.history], failed)
            self._feasibility = (len(self.history), model)
        return self._feasibility[1]

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
        self._feasibility = (-1, None)
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


class FeasibilityModel:
    """The chance that a genotype runs, from which told trials ran and which failed: a noisy-OR
    over the space's decisions. Each value v of each decision d fails a trial on its own with
    chance q[d, v], independently, so

        P(fail | x) = 1 - prod_d (1 - q[d, x_d]).

    This is the shape of the failures a search meets: an op the runtime lacks fails every cell
    that holds it (q = 1 for that op), and a size limit fails more often with every larger choice
    (each multiplies the chance of running down). A logistic model, linear in the log-odds,
    cannot say "fails if any decision is bad" as well: fitted on the same NAS-Bench-201 trials it
    rejected much less of the failure region for the same share of cells that run turned down.

    q is the maximum a posteriori estimate under a Beta(1, 2) prior on each q[d, v], i.e. as if
    each value had also been held by one trial that ran (a value seen once, in one failure, is
    not yet condemned), found by EM: a failure's blame is shared among its values in proportion
    to q (E step, E[value v caused it] = q_v / P(fail)), and q_v is the blame v collected over
    the trials holding it, plus the prior (M step). The log posterior is concave in -log(1 - q),
    so EM climbs to a global optimum (from the same start, and at most `max_iter` steps); the rows
    are sorted first, so the fit depends on the set of trials, not on the order in which a resumed
    run re-told them (tests/test_strategy_failures.py).
    """

    PRIOR_RAN = 1.0  # Beta(1, 1 + PRIOR_RAN): pseudo-trials that ran, per value

    def __init__(self, space: SearchSpace, max_iter: int = 500, tol: float = 1e-7):
        self.space, self.max_iter, self.tol = space, max_iter, tol
        # one column per (decision, value), as the samplers see the space; not `space.encode`,
        # a surrogate's features (NB201's merges equivalent cells and adds counts)
        self._column: dict[tuple[str, Any], int] = {}
        for d in space.dims:
            for value in d.choices:
                self._column.setdefault((d.name, value), len(self._column))
        self.q = np.zeros(len(self._column))

    def one_hot(self, g: Genotype) -> np.ndarray:
        x = np.zeros(len(self._column))
        x[[self._column[item] for item in self.space.to_dims(g).items()]] = 1.0
        return x

    def fit(self, genotypes: list[Genotype], failed: list[bool]) -> FeasibilityModel:
        rows = sorted(
            zip((self.one_hot(g) for g in genotypes), failed, strict=True),
            key=lambda r: (r[1], r[0].tobytes()),
        )
        X = np.array([x for x, _ in rows], dtype=np.float64)
        bad = X[np.array([f for _, f in rows], dtype=bool)]
        held = X.sum(axis=0)
        # start from blaming every decision alike for the observed failure rate
        share = len(bad) / len(X)
        q = np.full(X.shape[1], 1.0 - (1.0 - share) ** (1.0 / max(1, len(self.space.dims))))
        for _ in range(self.max_iter):
            p_fail = -np.expm1(bad @ np.log1p(-q))  # of each failed trial, under the current q
            blame = (bad * q).T @ (1.0 / np.maximum(p_fail, 1e-300))
            new = np.minimum(blame / (held + self.PRIOR_RAN), 1.0 - 1e-12)
            converged = np.abs(new - q).max() < self.tol
            q = new
            if converged:
                break
        self.q = q
        return self

    def p_run(self, g: Genotype) -> float:
        return float(np.exp(self.one_hot(g) @ np.log1p(-self.q)))


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
