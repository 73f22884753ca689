"""kernels.launch's Launcher and Plan on stand-ins for a compiled Triton kernel laid out as Triton 3.6
lays it out (the GPU tests launch the real ones: test_matmul4bit's plan test)."""

from types import SimpleNamespace

import pytest

from qtune.kernels import launch


class _Recorder:
    """A C function (no __code__, as a compiled extension's) or compiled.run: records its arguments."""

    def __init__(self, calls, name, **attrs):
        self.calls, self.name = calls, name
        self.__dict__.update(attrs)

    def __call__(self, *args):
        self.calls.append((self.name, args))


def _compiled(calls, wrapped=True, scratch=0):
    """A compiled kernel whose C launcher records its arguments; `wrapped`: behind Triton's
    tensor-descriptor wrapper (descriptors at parameters 1 and 2)."""
    c_launch = _Recorder(calls, "c")

    def wrap(launcher, tensordesc_indices, tensordesc_meta):  # as triton's wrap_handle_tensordesc
        def inner(*args):
            return launcher, tensordesc_indices, tensordesc_meta
        return inner

    run = _Recorder(calls, "run", launch=wrap(c_launch, {2, 1}, ["meta x", "meta w"]) if wrapped else c_launch,
                    global_scratch_size=scratch, profile_scratch_size=0, launch_cooperative_grid=False, launch_pdl=True)
    return SimpleNamespace(run=run, function="fn", packed_metadata="md")


@pytest.fixture
def c_launch(monkeypatch):
    monkeypatch.setattr(launch, "C_LAUNCH", True)
    monkeypatch.setattr(launch, "make_tensordesc_arg", lambda desc, meta: [f"map {desc} {meta}", 64, 32, 32, 1])


def test_launcher_calls_the_c_function_with_descriptors_encoded(c_launch):
    calls = []
    compiled = _compiled(calls)
    launcher = launch.Launcher(compiled, ("BLOCK",))
    assert launcher.descs == ((2, "meta w"), (1, "meta x")) and launcher.metas == {1: "meta x", 2: "meta w"}
    launcher((3, 1, 1), 77, launcher.values((10, "xd", "wd", 5), {"BLOCK": 128}))
    head = ("fn", False, True, None, None, "md", None, None, None)
    assert calls == [("c", (3, 1, 1, 77, *head, 10, "map xd meta x", 64, 32, 32, 1, "map wd meta w", 64, 32, 32, 1,
                            5, 128))]


def test_plan_replays_with_edits(c_launch):
    calls = []
    compiled = _compiled(calls)
    launcher = launch.Launcher(compiled, ())
    plan = launch.Plan.of(launcher, (3,), (10, "xd", "wd", 5), {})
    assert plan.grid == (3, 1, 1)
    plan(5, (0, [11, "new x map", 1, 2, 3, 4]))
    args = calls[-1][1]
    assert args[:4] == (3, 1, 1, 5) and args[13:] == (11, "new x map", 1, 2, 3, 4, "map wd meta w", 64, 32, 32, 1, 5)
    assert plan.values[0] == 10  # the plan itself is not edited
    assert launch.Plan.of(None, (3,), (), {}) is None


@pytest.mark.parametrize("c_launch_on,scratch,wrapped", [(False, 0, True), (True, 256, True)])
def test_launcher_falls_back_to_compiled_run(monkeypatch, c_launch_on, scratch, wrapped):
    """Another Triton (C_LAUNCH off) or a kernel needing scratch memory: compiled.run, no plan."""
    monkeypatch.setattr(launch, "C_LAUNCH", c_launch_on)
    calls = []
    compiled = _compiled(calls, wrapped, scratch)
    launcher = launch.Launcher(compiled, ())
    assert launcher.c is None and launcher.metas == {} and launch.Plan.of(launcher, (1,), (1,), {}) is None
    launcher((2, 1, 1), 9, [4])
    assert calls == [("run", (2, 1, 1, 9, "fn", "md", None, None, None, 4))]


def test_launcher_without_descriptors_takes_the_c_function_itself(c_launch):
    calls = []
    compiled = _compiled(calls, wrapped=False)
    launcher = launch.Launcher(compiled, ())
    assert launcher.descs == () and launcher.metas == {} and launcher.c is compiled.run.launch


def test_remember_bounds_the_plans(monkeypatch):
    monkeypatch.setattr(launch, "PLAN_LIMIT", 2)
    plans = {}
    for key in range(3):
        launch.remember(plans, (key,), "plan")
    launch.remember(plans, (9,), None)
    assert plans == {(2,): "plan"}
