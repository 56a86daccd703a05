"""Fusion-scaling benchmark: how long a slider change takes against a full forward.

    python bench/fusion.py [--size 518] [--runs 5] [--layouts vits,vitl] [--out bench/results/fusion.md]

For each Depth-Anything v2 layout (tests/fixtures.py: the official layout with
deterministic random weights; speed does not depend on the values), on one and the same
size x size input (a real photo from assets/, preprocessed), in one process:

  forward          model(x): encoder + decoder, what a change of image costs
  re-render        model.decode(feats, scales) on cached features, the factors changing
                   every call (what one slider event costs; the fusion stages the changed factors do
                   not reach come from the previous call, as in the app)
  re-render + post the same, plus model.postprocess back to the photo's size
  decode, no cache the decoder from the encoder maps (reassemble + layer_rn + fusion +
                   head): what a re-render would cost without the fusion-input cache

The four are interleaved round by round (the machine is shared: medians, ratios inside
one process). Then one decode is cut into its stages (reassemble[i], layer_rn[i],
fusion[3] .. fusion[0], head), each timed on its own, median of --runs; the staged output
is checked to be exactly the decoder's, so the profile measures the real code path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine, median_ms, write_results  # noqa: E402  (sets sys.path)
from fixtures import save_fixture_checkpoint  # noqa: E402

import dpt_lab  # noqa: E402
from dpt_lab import fastpath  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "assets" / "astronaut.jpg"  # 512 x 512: lower_bound 518 gives a 518 x 518 input
STEMS = {"vits": "depth_anything_v2_vits", "vitb": "depth_anything_v2_vitb", "vitl": "depth_anything_v2_vitl"}


def staged_decode(decoder, feats, scales, clock):
    """One decode, stage by stage (the decoder's own modules, in its order); clock(name, fn)
    runs fn and records its time."""
    maps, cls = feats.maps, feats.cls
    layers = []
    for i in range(4):
        m = maps[i]
        if decoder.reassemble is not None:
            c = None if cls is None else cls[i]
            m = clock(f"reassemble[{i}]", lambda m=m, c=c, i=i: decoder.reassemble[i](m, c))
        layers.append(clock(f"layer_rn[{i}]", lambda m=m, i=i: decoder.layer_rn[i](m)))
    layers = [m * float(s) for m, s in zip(layers, scales)]
    sizes = [m.shape[-2:] for m in layers]
    path = clock("fusion[3]", lambda: decoder.fusion[3](layers[3], None, sizes[2]))
    path = clock("fusion[2]", lambda: decoder.fusion[2](path, layers[2], sizes[1]))
    path = clock("fusion[1]", lambda: decoder.fusion[1](path, layers[1], sizes[0]))
    h0, w0 = sizes[0]
    finest = decoder.fusion[0]
    if fastpath.active(path, finest, decoder.head):   # as decoder.fuse: the head upsamples in bands
        low = clock("fusion[0]", lambda: finest.merge(path + finest.rcu1(layers[0]), None))
        return clock("head", lambda: decoder.head.from_low_res(low, (2 * h0, 2 * w0), feats.out_size))
    path = clock("fusion[0]", lambda: finest(path, layers[0], (2 * h0, 2 * w0)))
    return clock("head", lambda: decoder.head(path, feats.out_size))


def profile(model, feats, runs: int) -> dict[str, tuple[float, float]]:
    """stage -> (median wall ms, median process CPU ms)."""
    times: dict[str, list[tuple[float, float]]] = {}

    def clock(name, fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        times.setdefault(name, []).append((time.perf_counter() - w, time.process_time() - c))
        return out

    scales = (0.5, 1.5, 1.0, 2.0)
    with torch.inference_mode():
        ref = model.decoder(feats.maps, feats.cls, feats.out_size, scales)
        for _ in range(runs + 1):
            out = staged_decode(model.decoder, feats, scales, clock)
    if not torch.equal(out, ref):
        raise SystemExit("staged decode differs from the decoder: the profile would not measure the real path")
    return {name: (median_ms([w for w, _ in v[1:]]), median_ms([c for _, c in v[1:]]))  # round 0: warm-up
            for name, v in times.items()}


def bench_layout(size_name: str, size: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = dpt_lab.load_model(save_fixture_checkpoint(STEMS[size_name], Path(tmp)))
    model.eval()
    x, meta = model.preprocess(PHOTO, base_size=size)
    with torch.inference_mode():
        feats = model.encode(x)
        exact = torch.equal(model.decode(feats, (1.0, 1.0, 1.0, 1.0)), model(x))
    # a slider moving: every call gets new factors
    values = iter(v / 100 for v in range(10**9))

    def scales():
        v = next(values) % 4.0 - 2.0
        return (1.0, v, 1.0 - v / 2, 1.0)

    def forward():
        with torch.inference_mode():
            model(x)

    def rerender():
        with torch.inference_mode():
            model.decode(feats, scales())

    def rerender_post():
        with torch.inference_mode():
            model.postprocess(model.decode(feats, scales()), meta)

    def uncached():
        with torch.inference_mode():
            model.decoder(feats.maps, feats.cls, feats.out_size, scales())

    fns = {"forward": forward, "re-render": rerender, "re-render + post": rerender_post, "decode, no cache": uncached}
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for r in range(runs + 1):  # round 0 warms up and is dropped
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            if r:
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    med = {k: median_ms(v) for k, v in wall.items()}
    # ratio per round (neighbours in time share the machine's load), then the median
    ratio = {k: statistics.median(a / f for a, f in zip(wall[k], wall["forward"])) for k in fns}
    cpu_ratio = {k: statistics.median(cpu[k]) / statistics.median(cpu["forward"]) for k in fns}
    stages = profile(model, feats, runs)
    info = model.info
    return dict(name=size_name, width=info.width, features=model.decoder.cfg.features, input=tuple(x.shape[-2:]),
                image=meta.image_size, med=med, cpu={k: median_ms(v) for k, v in cpu.items()}, ratio=ratio,
                cpu_ratio=cpu_ratio, stages=stages, exact=exact)


def render(results: list[dict], args) -> str:
    cmd = f"python bench/fusion.py --size {args.size} --runs {args.runs} --layouts {args.layouts}"
    lines = [
        "## Fusion scaling: slider re-render vs full forward",
        "",
        f"Machine: {machine()}. Command: `{cmd}`.",
        f"Input: `assets/{PHOTO.name}` preprocessed at base size {args.size} (input {results[0]['input'][0]}x"
        f"{results[0]['input'][1]}, photo {results[0]['image'][0]}x{results[0]['image'][1]}); Depth-Anything v2 layouts "
        "from the parity fixtures. Interleaved rounds, one process.",
        "",
        "| layout | forward | re-render (decode) | re-render + postprocess | decode without the cache | "
        "re-render / forward (with post) | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, c, q, cq = r["med"], r["cpu"], r["ratio"], r["cpu_ratio"]
        goal = ("<= 0.5 (" + ("ok" if q["re-render + post"] <= 0.5 else "MISSED") + ")") if r["name"] == "vits" else "(reported)"
        cell = lambda k: f"{m[k]:.0f} ms ({c[k]:.0f})"  # noqa: E731
        lines.append(f"| ViT-{r['name'][-1].upper()} (width {r['width']}, decoder {r['features']}) | {cell('forward')} | "
                     f"{cell('re-render')} | {cell('re-render + post')} | {cell('decode, no cache')} | "
                     f"{q['re-render']:.3f} ({q['re-render + post']:.3f}); CPU {cq['re-render']:.3f} ({cq['re-render + post']:.3f}) "
                     f"| {goal} |")
    lines += ["", "Wall-time medians, process CPU time in brackets; the ratios are medians of per-round ratios "
              "(wall) and the ratio of CPU medians."]
    lines += ["", "`decode(encode(x), (1,1,1,1))` equal to `model(x)` (torch.equal): "
              + ", ".join(f"ViT-{r['name'][-1].upper()} {'yes' if r['exact'] else 'NO'}" for r in results) + ".", ""]
    lines += ["Where one decode's time goes (stages timed one by one, median of the runs; reassemble and layer_rn "
              "run once per image and are cached, a slider change runs fusion + head):", ""]
    names = list(results[0]["stages"])
    lines.append("| stage | " + " | ".join(f"ViT-{r['name'][-1].upper()} wall (CPU), share of CPU" for r in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{r['stages'][n][0]:.1f} ms ({r['stages'][n][1]:.1f}), {100 * r['stages'][n][1] / sum(c for _, c in r['stages'].values()):.0f}%"
            for r in results) + " |")
    for label, keys in (("cached per image (reassemble + layer_rn)", lambda n: n.startswith(("reassemble", "layer_rn"))),
                        ("per slider change (fusion + head)", lambda n: not n.startswith(("reassemble", "layer_rn")))):
        lines.append(f"| **{label}** | " + " | ".join(
            f"{sum(v[0] for n, v in r['stages'].items() if keys(n)):.1f} ms ({sum(v[1] for n, v in r['stages'].items() if keys(n)):.1f}), "
            f"{100 * sum(v[1] for n, v in r['stages'].items() if keys(n)) / sum(v[1] for v in r['stages'].values()):.0f}%"
            for r in results) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layouts", default="vits,vitl", help="comma-separated: vits, vitb, vitl")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fusion.md"), help="'' to only print")
    args = parser.parse_args()
    results = []
    for name in args.layouts.split(","):
        t0 = time.perf_counter()
        results.append(bench_layout(name.strip(), args.size, args.runs))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    write_results(render(results, args), args.out)


if __name__ == "__main__":
    main()
