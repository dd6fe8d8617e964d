"""A callable object as the Hydra task (not a function): ``python callable_task.py -m``."""

import hydra
from omegaconf import DictConfig


class Shifted:
    """(x - shift)^2: the object carries state that the worker must receive."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def __call__(self, cfg: DictConfig) -> float:
        return (cfg.x - self.shift) ** 2


TASK = Shifted(shift=2.0)

if __name__ == "__main__":
    hydra.main(version_base=None, config_path="conf", config_name="config")(TASK)()
