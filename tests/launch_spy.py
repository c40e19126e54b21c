"""Launcher-level checks of the Triton ops that the interpreter cannot make by running kernels.

``spy_launches(monkeypatch, module, guard_name)`` replaces every Triton kernel of an ops module by
a stand-in that records, per launch, the kernel name, the grid (a callable grid is evaluated with
the autotuner's first config, the one the interpreter uses) and whether the launch happened inside
the module's device guard (also replaced, by a recorder). Two GPU-only failure modes become
visible on the CPU this way:

- a launch outside ``with torch.cuda.device(tensor.device)``: Triton launches on the *current*
  device, so a multi-GPU process would run the kernel on the wrong GPU;
- a grid whose axis 1 or 2 exceeds CUDA's 65535 limit (only axis 0 may grow with T).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

CUDA_GRID_YZ_MAX = 65535


@dataclass
class LaunchLog:
    launches: list = field(default_factory=list)  # (kernel name, grid tuple, inside guard, guard devices)
    guard_devices: list = field(default_factory=list)
    depth: int = 0

    def assert_guarded(self, device):
        assert self.launches, "no kernel was launched"
        for name, _, inside, devices in self.launches:
            assert inside, f"{name} launched outside the device guard"
            assert devices[-1] == device, f"{name} launched under a guard for {devices[-1]}, not {device}"

    def assert_grid_within_cuda_limits(self):
        assert self.launches, "no kernel was launched"
        for name, grid, _, _ in self.launches:
            assert all(int(g) <= CUDA_GRID_YZ_MAX for g in grid[1:]), f"{name}: grid {grid} exceeds 65535 on axis 1/2"
            assert all(int(g) >= 1 for g in grid), f"{name}: empty grid {grid}"


class _KernelSpy:
    def __init__(self, name, kernel, log: LaunchLog, run: bool):
        self.name, self.kernel, self.log, self.run = name, kernel, log, run

    @property
    def fn(self):
        """An autotuned kernel's JITFunction, launched directly with a fixed config."""
        return _KernelSpy(self.name, self.kernel.fn, self.log, self.run)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            g = grid
            if callable(g):
                meta = dict(kwargs)
                meta.update(self.kernel.configs[0].kwargs)  # autotuned: the config the interpreter uses
                g = g(meta)
            g = tuple(g)
            self.log.launches.append((self.name, g, self.log.depth > 0, list(self.log.guard_devices)))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
            return None
        return launch


def spy_launches(monkeypatch, module, guard_name: str, run: bool = True) -> LaunchLog:
    """Patch ``module``'s kernels (every attribute ending in ``_kernel``) and its device guard
    ``guard_name`` (a callable ``device -> context manager``). ``run=False`` records without
    launching (for grids of huge shapes whose outputs are never looked at)."""
    log = LaunchLog()

    @contextlib.contextmanager
    def guard(device):
        log.depth += 1
        log.guard_devices.append(device)
        try:
            yield
        finally:
            log.depth -= 1

    monkeypatch.setattr(module, guard_name, guard)
    names = [n for n in vars(module) if n.endswith("_kernel") and not n.startswith("__")]
    assert names, f"no kernels found in {module.__name__}"
    for n in names:
        kernel = getattr(module, n)
        kernel = kernel.kernel if isinstance(kernel, _KernelSpy) else kernel  # spied twice in one test
        monkeypatch.setattr(module, n, _KernelSpy(n, kernel, log, run))
    return log
