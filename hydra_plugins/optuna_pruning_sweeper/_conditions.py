"""The conditional-space resolver: which params and fixed overrides apply to a trial.

The rule itself is documented in ``_distributions``: a param under a swept config group is
sampled only when the option chosen in that trial has the key (checked on the option's
composed config); an explicit ``when:`` replaces the automatic rule. ``sample_trial`` asks
the trial for the active params in dependency order and returns the trial's overrides.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process, and a plain run should not pay for Optuna.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ._distributions import (
    Param,
    SearchSpace,
    condition_parent,
    explicit_condition_holds,
    format_override,
    suggest,
)

if TYPE_CHECKING:
    import optuna

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))


class ConditionResolver:
    """Decides which params and fixed overrides apply, given the options chosen so far."""

    def __init__(
        self,
        space: SearchSpace,
        config_loader: Any,
        master_config: DictConfig,
        swept_in_file: frozenset[str] = frozenset(),
    ) -> None:
        self.space = space
        self.config_loader = config_loader
        self.master_config = master_config
        from optuna.distributions import CategoricalDistribution

        repo = getattr(config_loader, "repository", None)
        self.groups: dict[str, Param] = {}  # config key -> swept group param
        for p in space.params.values():
            if isinstance(p.distribution, CategoricalDistribution) and repo is not None:
                group_path = p.key.replace(".", "/")
                if repo.group_exists(group_path):
                    self._check_options(repo, group_path, p)
                    self.groups[p.key] = p
        # Groups the search-space file sweeps but the command line fixes (optimizer=adam):
        # their children are resolved against the fixed option, which the composed config
        # already holds (keys it lacks drop out of the search; keys it has stay).
        self.fixed_groups = {
            f.key for f in space.fixed.values()
            if f.key in swept_in_file and repo is not None
            and repo.group_exists(f.key.replace(".", "/"))
        }
        self._parents = {
            key: condition_parent(key, [*self.groups, *self.fixed_groups])
            for key in [p.key for p in space.params.values()] + list(space.fixed)
        }
        self._base_lines = [f.line for f in space.fixed.values() if self._parents[f.key] is None]
        # Fixed values as explicit `when:` conditions see them (override text, e.g. "none").
        self._fixed_values = {
            f.line.split("=", 1)[0].lstrip("+"): f.line.split("=", 1)[1]
            for f in space.fixed.values() if "=" in f.line
        }
        self._composed: dict[tuple[str, Any], Any] = {}

    @staticmethod
    def _check_options(repo: Any, group_path: str, p: Param) -> None:
        from optuna.distributions import CategoricalDistribution

        assert isinstance(p.distribution, CategoricalDistribution)
        missing = [c for c in p.distribution.choices if not repo.config_exists(f"{group_path}/{c}")]
        if missing:
            raise ValueError(
                f"hydra.sweeper.params.{p.name}: option(s) {missing} not found in config group "
                f"'{group_path}' (available: {repo.get_group_options(group_path)})"
            )

    def check_keys_exist(self) -> None:
        """Refuse a swept or fixed key the composed config does not have, before any trial.

        Keys under a swept group are checked per option by the conditional rule; keys
        added with ``+`` and explicit ``when:`` conditions are the user's own business.
        """
        entries = [(p.name, p.key, p.when) for p in self.space.params.values()]
        entries += [(f.line.split("=", 1)[0], f.key, None) for f in self.space.fixed.values()]
        under_fixed: dict[str, list[str]] = {}  # fixed group line -> swept keys it lacks
        for name, key, when in entries:
            if name.startswith(("+", "~")) or when is not None or key in self.groups:
                continue
            if key.startswith("hydra.") or self._parents.get(key) is not None:
                continue
            repo = getattr(self.config_loader, "repository", None)
            if repo is not None and repo.group_exists(key.replace(".", "/")):
                continue
            if not _has_key(self.master_config, key):
                fixed = self._fixed_group_of(key)
                if fixed is not None:
                    under_fixed.setdefault(fixed, []).append(name)
                    continue
                raise ValueError(
                    f"hydra.sweeper.params / override {name!r}: the composed config has no key "
                    f"{key!r} (a typo? a key of a config group option that is not selected?); "
                    f"to add a new key write +{name}"
                )
        for fixed, names in under_fixed.items():
            raise ValueError(self._fixed_group_message(fixed, names))

    def _fixed_group_message(self, fixed: str, names: list[str]) -> str:
        """What to do when the search space sweeps keys a fixed group option lacks."""
        choices = OmegaConf.select(self.master_config, "hydra.runtime.choices", default={}) or {}
        space = choices.get("search_space")
        by = f"search_space={space}" if space else "hydra.sweeper.params"
        group, option = fixed.split("=", 1)
        spaces = []
        repo = getattr(self.config_loader, "repository", None)
        if repo is not None and repo.group_exists("search_space"):
            spaces = [o for o in repo.get_group_options("search_space") if o == option]
        advice = f"use search_space={spaces[0]}, or " if spaces else "use a space for it, or "
        keys = ", ".join(names)
        return (
            f"{keys} {'is' if len(names) == 1 else 'are'} swept by {by}, but {fixed} (fixed on "
            f"the command line) has no such key{'' if len(names) == 1 else 's'}: {advice}drop "
            f"{'it' if len(names) == 1 else 'them'} with hydra.sweeper.exclude=[{','.join(names)}]"
        )

    def _fixed_group_of(self, key: str) -> str | None:
        """The fixed group override (``model=transfer``) that ``key`` lives under, if any."""
        repo = getattr(self.config_loader, "repository", None)
        lines = {f.key: f.line for f in self.space.fixed.values()
                 if repo is not None and repo.group_exists(f.key.replace(".", "/"))}
        group = condition_parent(key, list(lines))
        return lines[group] if group is not None else None

    def order(self) -> list[Param]:
        """Params in sampling order: parents (shallow keys) first, explicit conditions last."""
        return sorted(
            self.space.params.values(),
            key=lambda p: (p.when is not None, p.key.count("."), p.name),
        )

    def parent(self, key: str) -> Param | None:
        """The swept group a key depends on (None for unconditional keys and fixed groups)."""
        g = self._parents.get(key)
        return self.groups.get(g) if g is not None else None

    def dropped_by_fixed_groups(self) -> dict[str, list[str]]:
        """Fixed group -> the swept keys it takes out of the search (its option lacks them)."""
        dropped: dict[str, list[str]] = {g: [] for g in sorted(self.fixed_groups)}
        for p in self.space.params.values():
            g = self._parents.get(p.key)
            if g in self.fixed_groups and p.when is None and not self.is_active(p.key, None, {}):
                dropped[g].append(p.name)
        return dropped

    def is_active(
        self, key: str, when: dict[str, list[str]] | None, chosen: dict[str, Any]
    ) -> bool:
        """Whether a param / fixed override with ``key`` applies to this trial."""
        if when is not None:  # a key fixed on the command line counts as chosen
            return explicit_condition_holds(when, {**self._fixed_values, **chosen})
        if self._parents.get(key) in self.fixed_groups:
            return _has_key(self.master_config, key)
        group = self.parent(key)
        if group is None:
            return True
        if group.name not in chosen:  # its group was not sampled itself
            return False
        return self.option_has_key(group, chosen[group.name], key)

    def option_has_key(self, group: Param, option: Any, key: str) -> bool:
        """Whether ``key`` exists when ``group`` is set to ``option``."""
        cache_key = (group.name, option)
        if cache_key not in self._composed:
            self._composed[cache_key] = self._compose(group, option)
        return _has_key(self._composed[cache_key], key)

    def _compose(self, group: Param, option: Any) -> Any:
        line = format_override(group.name, option)
        try:
            return self.config_loader.load_sweep_config(
                self.master_config, [*self._base_lines, line]
            )
        except Exception as compose_error:  # noqa: BLE001 - fall back to the option's own file
            repo = self.config_loader.repository
            group_path = group.key.replace(".", "/")
            result = repo.load_config(f"{group_path}/{option}")
            if result is None:
                raise RuntimeError(
                    f"cannot tell which keys option '{option}' of swept group '{group.name}' "
                    f"has: composing with {line!r} failed ({compose_error}) and "
                    f"'{group_path}/{option}' was not found"
                ) from compose_error
            log.debug("compose with %s failed (%s); using the option file", line, compose_error)
            # Keys of the option file are relative to the group's package.
            return _nest(group.key, result.config if result.config is not None else {})


def sample_trial(
    trial: optuna.trial.Trial, resolver: ConditionResolver
) -> tuple[dict[str, Any], list[str]]:
    """Sample the active params of ``trial``; returns (params, override lines)."""
    chosen: dict[str, Any] = {}
    for p in resolver.order():
        if resolver.is_active(p.key, p.when, chosen):
            chosen[p.name] = suggest(trial, p)
    lines = [
        f.line for f in resolver.space.fixed.values() if resolver.is_active(f.key, None, chosen)
    ]
    lines += [format_override(name, value) for name, value in chosen.items()]
    return chosen, lines


def _has_key(cfg: Any, dotted: str) -> bool:
    """Whether ``dotted`` exists in ``cfg`` (MISSING / unresolved values count as present)."""
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, DictConfig):
            if part not in node.keys():  # noqa: SIM118 - `in node` is False for ???
                return False
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return False
    return True


def _nest(dotted: str, cfg: Any) -> DictConfig:
    root: dict[str, Any] = {}
    node = root
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = cfg
    return OmegaConf.create(root)

