"""A killed trial driver's worker group must not hold its CPUs until the command ends (found by bench/chaos.py),
which on an embedded Ray is what Ray Train's own placement-group cleaner would do, at a cost to every trial."""

from __future__ import annotations

import time


def test_a_dead_actors_placement_group_is_released_and_a_drivers_is_kept(ray_session):
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from mode_ray.ray_env.runtime import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:  # as Ray Train's controller: an actor that reserves its workers' CPUs
        def reserve(self) -> str:
            group = placement_group([{"CPU": 0.5}])
            ray.get(group.ready())
            return group.id.hex()

    drivers = placement_group([{"CPU": 0.25}])  # a group made by the driver
    ray.get(drivers.ready())
    controller = Controller.remote()
    orphan = ray.get(controller.reserve.remote())
    ray.kill(controller)
    time.sleep(1)
    assert placement_group_table()[orphan]["state"] == "CREATED"  # Ray keeps it while the job lives
    assert release_orphaned_placement_groups() == 1
    assert placement_group_table()[orphan]["state"] == "REMOVED"
    assert placement_group_table()[drivers.id.hex()]["state"] == "CREATED"
    assert release_orphaned_placement_groups() == 0
    remove_placement_group(drivers)


def test_the_runners_trainer_starts_no_dataset_manager_nor_on_an_embedded_ray_a_cleaner(ray_session):
    """Ray Train starts a `DatasetManager` actor in every trial, datasets or none; the runner passes none (each
    worker opens its own stream), so its trainer drops that callback. The placement-group cleaner guards a
    worker group's placement group against a dead controller, which the check above covers on an embedded Ray;
    started and awaited at every trial, it cost ~3 s of each. A cluster keeps it. Every other callback stays."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from mode_ray.runner.trial import trainer_class

    def kinds(cls: type) -> list[str]:
        trainer = cls(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
        return sorted(type(c).__name__ for c in trainer._create_default_callbacks())

    stock = kinds(TorchTrainer)
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback"} <= set(stock) and len(stock) > 4
    assert kinds(trainer_class(embedded_ray=False)) == [k for k in stock if k != "DatasetsCallback"]
    unused = ("PlacementGroupCleanerCallback", "DatasetsCallback")
    assert kinds(trainer_class(embedded_ray=True)) == [k for k in stock if k not in unused]
