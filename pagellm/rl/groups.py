"""Ray glue: each PPO role as a group of actors in one placement group, or in this process.

``RayRoles`` places every actor through a placement group: with ``colocate`` the i-th worker of
every role shares bundle i (several roles on one GPU, each with its fraction), otherwise each
actor has its own bundle. ``LocalRoles`` holds the same role objects in the driver's process
(the single-process baseline of ``bench/ppo_iteration.py``). Both expose ``submit`` (start a
method on every worker of a role with its shard) and ``collect`` (wait for the results), so
the driver starts the roles' work together and waits once.
"""

from __future__ import annotations

from typing import Callable

from pagellm.config import PPOConfig, RoleConfig

# a role: the worker class and its constructor keyword arguments for (rank, world)
RoleSpec = tuple[type, Callable[[int, int], dict]]


class LocalRoles:
    """Every role in this process, one worker each; calls run when submitted."""

    def __init__(self, specs: dict[str, RoleSpec], ppo: PPOConfig):
        self.workers = {role: [cls(**kwargs(0, 1))] for role, (cls, kwargs) in specs.items()}

    def world(self, role: str) -> int:
        return 1

    def submit(self, role: str, method: str, args_per_worker: list[tuple]) -> list:
        return [getattr(w, method)(*args) for w, args in zip(self.workers[role], args_per_worker)]

    def collect(self, pending: list) -> list:
        return pending

    def shutdown(self) -> None:
        self.workers.clear()


def role_bundles(ppo: PPOConfig, roles: tuple[str, ...]) -> tuple[list[dict], dict[tuple[str, int], int]]:
    """The placement group bundles of the roles and the bundle of each (role, worker index):
    with ``colocate`` the i-th worker of every role shares bundle i, else one bundle each."""
    conf: dict[str, RoleConfig] = {role: getattr(ppo, role) for role in roles}
    if ppo.colocate:
        bundles = []
        for i in range(max(r.num_workers for r in conf.values())):
            members = [r for r in conf.values() if r.num_workers > i]
            bundle = {"CPU": sum(r.num_cpus for r in members)}
            gpus = sum(r.num_gpus for r in members)
            if gpus:
                bundle["GPU"] = float(gpus)
            for r in members:
                for name, amount in r.resources.items():
                    bundle[name] = bundle.get(name, 0.0) + amount
            bundles.append(bundle)
        return bundles, {(role, i): i for role, r in conf.items() for i in range(r.num_workers)}
    bundles, where = [], {}
    for role, r in conf.items():
        for i in range(r.num_workers):
            where[(role, i)] = len(bundles)
            bundles.append({"CPU": r.num_cpus, **({"GPU": r.num_gpus} if r.num_gpus else {}), **r.resources})
    return bundles, where


class RayRoles:
    """One Ray actor per worker of each role, placed through one placement group: its own, or
    (inside a Ray Tune trial) the trial's, whose bundles from ``first_bundle`` on are
    ``role_bundles`` (bundle 0 holds the trial's driver)."""

    def __init__(self, specs: dict[str, RoleSpec], ppo: PPOConfig, placement_group=None, first_bundle: int = 0):
        import ray
        from ray.util.placement_group import placement_group as new_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles, where = role_bundles(ppo, tuple(specs))
        self.owns_pg = placement_group is None
        self.pg = new_placement_group(bundles, strategy="PACK") if self.owns_pg else placement_group
        ray.get(self.pg.ready(), timeout=600)
        self.workers = {}
        for role in specs:
            r: RoleConfig = getattr(ppo, role)
            cls, kwargs = specs[role]
            actor_cls = ray.remote(cls)
            self.workers[role] = [
                actor_cls.options(
                    num_cpus=r.num_cpus,
                    num_gpus=r.num_gpus,
                    resources=dict(r.resources),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.pg, placement_group_bundle_index=first_bundle + where[(role, i)]
                    ),
                ).remote(**kwargs(i, r.num_workers))
                for i in range(r.num_workers)
            ]
        ray.get([w.ready.remote() for ws in self.workers.values() for w in ws])

    def world(self, role: str) -> int:
        return len(self.workers[role])

    def submit(self, role: str, method: str, args_per_worker: list[tuple]) -> list:
        return [getattr(w, method).remote(*args) for w, args in zip(self.workers[role], args_per_worker)]

    def collect(self, pending: list) -> list:
        import ray

        return ray.get(pending)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for ws in self.workers.values():
            for w in ws:
                ray.kill(w)
        if self.owns_pg:
            remove_placement_group(self.pg)
        self.workers.clear()
