"""Which implementation kernels.ops runs, for each device and MEDAI_KERNELS setting."""

import pytest
import torch

from medai.kernels.dispatch import OPS, KernelOp, KernelUnavailableError, dispatch, register_op, select_backend

OP = "_dispatch_probe"
WITHOUT_TRITON = "_dispatch_probe_ref_only"
WITH_PEER = "_dispatch_probe_with_peer"  # 'json' stands in for an installed peer package
WITH_MISSING_PEER = "_dispatch_probe_with_missing_peer"


def reference_impl(x):
    return ("reference", x)


def triton_impl(x):
    return ("triton", x)


@pytest.fixture(autouse=True, scope="module")
def probe_ops():
    register_op(OP, reference=f"{__name__}:reference_impl", triton=f"{__name__}:triton_impl")
    register_op(WITHOUT_TRITON, reference=f"{__name__}:reference_impl")
    register_op(WITH_PEER, reference=f"{__name__}:reference_impl", triton=f"{__name__}:triton_impl",
                peer="json:dumps")
    register_op(WITH_MISSING_PEER, reference=f"{__name__}:reference_impl", triton=f"{__name__}:triton_impl",
                peer="medai_no_such_package.ops:fn")
    yield
    for name in (OP, WITHOUT_TRITON, WITH_PEER, WITH_MISSING_PEER):
        OPS._entries.pop(name)


@pytest.mark.parametrize(
    "mode,interpret,device,expected",
    [
        ("auto", "0", "cpu", "reference"),
        ("auto", "1", "cpu", "reference"),
        ("auto", "0", "cuda", "triton"),
        ("reference", "0", "cuda", "reference"),
        ("reference", "1", "cpu", "reference"),
        ("triton", "1", "cpu", "triton"),
        ("triton", "0", "cuda", "triton"),
    ],
)
def test_backend_table(monkeypatch, mode, interpret, device, expected):
    monkeypatch.setenv("MEDAI_KERNELS", mode)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert select_backend(OP, device) == expected


def test_forced_triton_on_cpu_without_interpreter_says_what_to_set(monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        select_backend(OP, "cpu")


def test_op_without_kernel(monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "auto")
    assert select_backend(WITHOUT_TRITON, "cuda") == "reference"
    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(KernelUnavailableError, match="no Triton kernel"):
        select_backend(WITHOUT_TRITON, "cpu")


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv("MEDAI_KERNELS", "fast")
    with pytest.raises(KernelUnavailableError, match="MEDAI_KERNELS='fast'"):
        select_backend(OP, "cpu")


def test_dispatch_calls_the_selected_implementation(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("MEDAI_KERNELS", "auto")
    assert dispatch(OP, x.device)(x)[0] == "reference"
    monkeypatch.setenv("MEDAI_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch(OP, x.device)(x)[0] == "triton"


def test_registering_twice_is_an_error():
    with pytest.raises(KeyError, match="already registered"):
        register_op(OP, reference=f"{__name__}:reference_impl")


@pytest.mark.parametrize(
    "op,mode,device,expected",
    [
        (WITH_PEER, "auto", "cuda", "peer"),
        (WITH_PEER, "auto", "cpu", "reference"),
        (WITH_PEER, "triton", "cuda", "triton"),
        (WITH_PEER, "reference", "cuda", "reference"),
        (WITH_MISSING_PEER, "auto", "cuda", "triton"),
    ],
)
def test_installed_peer_wins_on_cuda_in_auto_mode_only(monkeypatch, op, mode, device, expected):
    monkeypatch.setenv("MEDAI_KERNELS", mode)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select_backend(op, device) == expected


def test_report_names_the_peer_package(monkeypatch):
    import json

    from medai.kernels.ops import backend_report

    monkeypatch.setenv("MEDAI_KERNELS", "auto")
    report = backend_report("cuda")
    assert report[WITH_PEER] == "peer (json)"
    assert report[WITH_MISSING_PEER] == "triton"
    assert report["selective_scan"] in ("triton", "peer (mamba_ssm)")
    assert OPS.get(WITH_PEER).load("peer") is json.dumps
