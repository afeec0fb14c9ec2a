import os

import pytest
import torch

# Tests never touch a model hub: every model is written from code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def _vm_size_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@pytest.fixture(autouse=True)
def _memory_cap(request):
    """Tests marked ``memcap`` (the hostile-input modules) run with the address space capped at what
    the process maps when the test starts plus the marker's GiB (default 2): a regression that
    allocates what a hostile input asks for fails with MemoryError instead of eating the machine.
    The soft limit is restored afterwards. Linux only (elsewhere the marker does nothing). Not for
    tests that start servers: a child would inherit the cap."""
    mark = request.node.get_closest_marker("memcap")
    vm = _vm_size_bytes() if mark is not None else None
    if vm is None:
        yield
        return
    import resource

    gib = float(mark.args[0]) if mark.args else 2.0
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + int(gib * 2**30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete diffusers-layout tiny CogView4 folder (real classes, random weights)."""
    from train.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "cogview4-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_stage2_weights(tiny_model_dir, tmp_path_factory):
    """A stage-2 DreamPainter file with non-zero gates and LoRA (so both have an effect)."""
    from train.tiny import write_random_dreampainter_weights

    return write_random_dreampainter_weights(tiny_model_dir, tmp_path_factory.mktemp("dp") / "stage2.safetensors", seed=1)


@pytest.fixture(scope="session")
def tiny_stage1_weights(tiny_model_dir, tiny_stage2_weights, tmp_path_factory):
    """The stage-1 branch of tiny_stage2_weights alone (what stage 2 started from)."""
    from dreampainter_core.loading import load_transformer
    from dreampainter_core.transformer import DreamPainterTransformer
    from dreampainter_core.weights import build_from_weights, save_dreampainter_weights

    stage2 = build_from_weights(load_transformer(tiny_model_dir / "transformer"), tiny_stage2_weights)
    config = stage2.config
    config.lora_rank = 0
    stage1 = DreamPainterTransformer(load_transformer(tiny_model_dir / "transformer"), config)
    stage1.control.load_state_dict(stage2.control.state_dict())
    return save_dreampainter_weights(stage1, tmp_path_factory.mktemp("dp1") / "stage1.safetensors")


@pytest.fixture(scope="session")
def tiny_single_files(tmp_path_factory):
    """The tiny model (seed 0) as a diffusers folder AND one safetensors file per component.

    Returns {"folder": Path, "single": Path holding transformer/vae/text_encoder.safetensors}.
    """
    from train.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny_single")
    folder = write_tiny_model(root / "cogview4-tiny", seed=0, single_files_dir=root / "single")
    return {"folder": folder, "single": root / "single"}


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test: on the shared 2-core CI box, one thread is faster
    than two contended ones for these tiny shapes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI test host (tests/comfy/comfy_harness.py), started once per session; skipped
    (or failed under CI) when it cannot run here."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "comfy"))
    import comfy_harness as h

    try:
        return h.get_host()
    except h.HostUnavailable as exc:
        h.skip_or_fail(str(exc))
