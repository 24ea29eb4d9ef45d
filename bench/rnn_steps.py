"""Where a persistent recurrence's time step goes (GPU only): `python -m bench rnn-steps`.

A persistent LSTM/GRU layer runs every time step in one launch: per step each program computes
its tile (the K loop of h W_hh^T, then the cell) and all programs meet at a grid barrier. The
benchmark gives the layer's total; this splits a step without instrumenting the kernel, from
times of the unchanged kernels:

  * per-step time = the slope of the layer's time over the sequence length,
    (t(2T) - t(T)) / T, which cancels what does not grow with it (the host path, the launch,
    the input projection's GEMM is T-proportional but measured apart below);
  * `persistent`: the cooperative grid, one tile a program, a barrier a step;
  * `one_program`: the same kernel on a grid of one program that runs every tile of a step in
    turn and needs no grid barrier, only a CTA barrier between steps (the schedule emulation
    runs): its step is the tiles' latency chained, so tile latency = its step / tiles, and
    barrier + skew = persistent step - tile latency (the slowest program's tile and the
    barrier's round trips);
  * `--configs`: the persistent step with each forward tuning candidate forced (tile shape,
    K depth, stages), so the K loop's share shows against its depth.

The input projection (one GEMM over all steps, also T-proportional) is timed alone
(`projection`) and subtracted from the forward slopes. fwd+bwd slopes come from the
persistent schedule with the tuner's choices. Times: triton.testing.do_bench medians (ms),
CUDA events; per-step figures in us.
"""
from __future__ import annotations

from .timing import case_command

# (kind, hidden, batch): DeepBench's quick recurrent shapes (bench/suites/lstm.py, gru.py)
CASES = {
    "lstm-h1024-b32": ("lstm", 1024, 32),
    "lstm-h256-b32": ("lstm", 256, 32),
    "lstm-h2048-b16": ("lstm", 2048, 16),
    "lstm-h512-b64": ("lstm", 512, 64),
    "gru-h1536-b32": ("gru", 1536, 32),
    "gru-h2560-b32": ("gru", 2560, 32),
}
DEFAULT_CASES = ("lstm-h1024-b32", "lstm-h256-b32", "gru-h1536-b32")


def split_step(persistent_us: float, one_program_us: float, tiles: int) -> dict:
    """The derived columns: a tile's latency (the one-program step over its tiles) and what the
    persistent step adds to it (the barrier and the slowest program's lag)."""
    tile = one_program_us / tiles
    return {"tile_us": tile, "barrier_and_skew_us": persistent_us - tile}


def _slope_us(time_ms, steps: int) -> float:
    """Per-step microseconds from the layer's time at `steps` and 2 * `steps` time steps."""
    return (time_ms(2 * steps) - time_ms(steps)) * 1e3 / steps


def _layer(kind: str, H: int, B: int, T: int, train: bool, device: str):
    """A thunk running one fp16 layer (input size H) on T steps, inputs requiring grad (the
    kernels the benchmark's training rows compile and tune, so a session finds them in
    Triton's cache); with `train`, forward and backward, else the forward alone."""
    import torch

    import pydl
    gen = torch.Generator(device=device).manual_seed(0)
    G = 4 if kind == "lstm" else 3
    scale = H ** -0.5
    weights = [(torch.randn(G * H, H, device=device, generator=gen) * scale).half()
               .requires_grad_() for _ in range(2)]
    weights += [(torch.randn(G * H, device=device, generator=gen) * scale).half()
                .requires_grad_() for _ in range(2)]
    x = torch.randn(T, B, H, device=device, generator=gen).half().requires_grad_()
    op = getattr(pydl, kind)
    if not train:
        return lambda: op(x, None, weights, algo="persistent")
    g = torch.randn(T, B, H, device=device, generator=gen).half()

    def run_train():
        out = op(x, None, weights, algo="persistent")[0]
        torch.autograd.backward(out, g)
    return run_train


def _projection(kind: str, H: int, B: int, T: int, device: str):
    """A thunk of the layer's input projection alone, as the layer runs it: pydl's GEMM of the
    (T*B, H) input by W_ih^T plus b_ih into fp32."""
    import torch

    from pydl._gemm import gemm
    G = 4 if kind == "lstm" else 3
    x = torch.randn(T * B, H, device=device).half()
    w = torch.randn(G * H, H, device=device).half()
    b = torch.randn(G * H, device=device).half()
    out = torch.empty(T * B, G * H, device=device)
    return lambda: gemm(x, w, out, trans_b=True, bias=b)


def _forced(config: dict | None):
    """Force the forward recurrence's tuner to `config` (None: tune as usual); plans reset."""
    from pydl import _tune
    _tune.reset()
    for name, tuner in _tune.Tuner.all.items():
        if name.endswith("_layer_fwd"):
            tuner.bench = (_tune._device_bench if config is None else
                           (lambda fn, cfg: 0.0 if cfg == config else 1.0))


def _tiles(config: dict, B: int, H: int) -> int:
    from pydl._launch import cdiv
    return cdiv(B, config["BLOCK_B"]) * cdiv(H, config["BLOCK_H"])


def _chosen_forward(kind: str) -> dict | None:
    from pydl import _tune
    chosen = list(_tune.Tuner.all[f"{kind}_layer_fwd"].chosen.values())
    return chosen[-1] if chosen else None


def measure(name: str, kind: str, H: int, B: int, steps: int, configs: bool, ms,
            device: str = "cuda") -> dict:
    """The row of one case; `ms(fn)` times a thunk in ms (bench/timing.py gpu_ms on a
    GPU)."""
    import torch

    from pydl import _rnn_launch

    def fwd_slope():
        return _slope_us(lambda T: ms(_layer(kind, H, B, T, False, device)), steps) - proj_us

    row: dict = {"case": name, "kind": kind, "hidden": H, "batch": B, "steps": steps}
    proj_us = _slope_us(lambda T: ms(_projection(kind, H, B, T, device)), steps)
    row["projection_us_per_step"] = proj_us
    _forced(None)
    row["persistent_fwd_us"] = fwd_slope()
    chosen = _chosen_forward(kind)
    row["config"] = chosen
    row["persistent_fwd_bwd_us"] = _slope_us(lambda T: ms(_layer(kind, H, B, T, True, device)),
                                             steps)
    if chosen is not None:
        original = _rnn_launch.persistent_on
        _forced(chosen)
        _rnn_launch.persistent_on = lambda device: False
        try:
            row["one_program_fwd_us"] = fwd_slope()
        finally:
            _rnn_launch.persistent_on = original
        row["tiles"] = _tiles(chosen, B, H)
        row.update(split_step(row["persistent_fwd_us"], row["one_program_fwd_us"], row["tiles"]))
    if configs:
        from pydl._rnn_launch import tile_configs
        _, candidates = tile_configs(f"{kind}_layer_fwd", B, H, H, torch.float16, (),
                                     torch.device(device))
        row["by_config"] = []
        for cfg in candidates:
            _forced(cfg)
            try:
                us = fwd_slope()
                if _chosen_forward(kind) != cfg:
                    raise RuntimeError(f"the tuner ran {_chosen_forward(kind)}, not this config")
                row["by_config"].append({"config": cfg, "fwd_us": us})
            except Exception as exc:  # noqa: BLE001 - a config that does not run is reported
                row["by_config"].append({"config": cfg, "error": f"{type(exc).__name__}: {exc}"})
    _forced(None)
    return row


def _print(row: dict) -> None:
    def us(key):
        v = row.get(key)
        return "-" if v is None else f"{v:.2f}"
    cfg = row.get("config") or {}
    print(f"{row['case']:16} fwd {us('persistent_fwd_us'):>7} us/step  fwd+bwd "
          f"{us('persistent_fwd_bwd_us'):>7}  one-program {us('one_program_fwd_us'):>8} "
          f"({row.get('tiles', '-')} tiles)  tile {us('tile_us'):>6}  barrier+skew "
          f"{us('barrier_and_skew_us'):>6}  projection {us('projection_us_per_step'):>6}  "
          + " ".join(f"{k}={v}" for k, v in cfg.items()))
    for entry in row.get("by_config", []):
        c = " ".join(f"{k}={v}" for k, v in entry["config"].items())
        print(f"{'':16}   {c:60} " + (f"fwd {entry['fwd_us']:.2f} us/step" if "fwd_us" in entry
                                       else entry["error"][:100]))


def main(argv: list[str] | None = None) -> int:
    def arguments(p):
        p.add_argument("--steps", type=int, default=25, help="T of the slope (T and 2T steps)")
        p.add_argument("--configs", action="store_true",
                       help="also the persistent step with each forward tuning candidate "
                            "forced")
    return case_command("rnn-steps", __doc__.split("\n\n")[0], CASES, DEFAULT_CASES, argv,
                        arguments, lambda name, args, ms: measure(
                            name, *CASES[name], args.steps, args.configs, ms), _print)
