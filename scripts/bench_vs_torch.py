#!/usr/bin/python3
"""Runs hesse's Hessian benchmark and the PyTorch anchor in one session, on the
same machine and memory setting, and prints both JSON objects with the ratios
ours / PyTorch's best method for every workload. With hvp_large it also runs
bench_curvature (matrix-free HVP, 20 power and 20 Lanczos steps, top-5, trace,
density) and compares its steps with the anchor's power iteration.

    /usr/bin/python3 scripts/bench_vs_torch.py --build build --anchor ../shared/anchors/anchor_torch.py \
        [--hugetlb] [--only mimo mlp_small_loss ...] [--out result.json]

--hugetlb runs both sides with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.
--rounds N runs both sides N times, alternating, and keeps each timing's best
round: the shared host runs at half speed in bursts lasting seconds to
minutes, and alternating gives both sides the same chance of a quiet spell.
Needs Debian's python3-torch for the anchor.
"""
import argparse
import json
import os
import subprocess
import sys

WORKLOADS = ["mimo", "mlp_small_loss", "mlp_medium_loss", "per_sample_model", "hvp_large"]


def best(methods, names=None):
    """(name, results) of the fastest successful method by median (among `names` if given)."""
    ok = [(m, r) for m, r in methods.items() if r.get("status") == "ok" and (names is None or m in names)]
    return min(ok, key=lambda x: x[1]["median_s"]) if ok else (None, {})


def compare(ours, theirs):
    """Ours against PyTorch's best method: the ratio of medians, and of minima
    (the shared host runs at half speed in bursts of seconds; a minimum is the
    time least touched by them)."""
    name, t = theirs
    out = {"ours_s": ours["median_s"], "torch_best": name, "torch_s": t.get("median_s"),
           "ratio": ours["median_s"] / t["median_s"] if t else None,
           "ours_min_s": ours.get("min_s"), "torch_min_s": t.get("min_s")}
    if t and ours.get("min_s") and t.get("min_s"):
        out["ratio_of_minima"] = ours["min_s"] / t["min_s"]
    return out


def fastest_rounds(rounds):
    """The rounds' results merged: every timing (a dict with median_s) from the
    round where its median was lowest, with min_s the lowest of all rounds."""
    first = rounds[0]
    if isinstance(first, dict) and "median_s" in first:
        timed = [r for r in rounds if isinstance(r, dict) and r.get("median_s") is not None]
        if not timed:
            return first
        best_round = dict(min(timed, key=lambda r: r["median_s"]))
        minima = [r["min_s"] for r in timed if r.get("min_s") is not None]
        if minima:
            best_round["min_s"] = min(minima)
        best_round["median_s_by_round"] = [r["median_s"] for r in timed]
        return best_round
    if isinstance(first, dict):
        return {k: fastest_rounds([r[k] for r in rounds if isinstance(r, dict) and k in r]) for k in first}
    return first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build")
    ap.add_argument("--anchor", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "anchors",
                                                     "anchor_torch.py"))
    ap.add_argument("--only", nargs="*", default=WORKLOADS)
    ap.add_argument("--hugetlb", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--method-timeout", type=int, default=90)
    ap.add_argument("--out", default="/tmp/hesse_vs_torch.json")
    a = ap.parse_args()
    env = dict(os.environ)
    if a.hugetlb:
        env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"

    def run_json(command):
        return json.loads(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout)

    hesse_rounds, curvature_rounds, torch_rounds = [], [], []
    anchor_out = a.out + ".anchor.json"
    for _ in range(a.rounds):
        hesse_rounds.append(run_json([os.path.join(a.build, "bench", "bench_hessian"), "--only", *a.only]))
        if "hvp_large" in a.only:
            curvature_rounds.append(run_json([os.path.join(a.build, "bench", "bench_curvature")]))
        subprocess.run(["/usr/bin/python3", a.anchor, "--only", *a.only, "--out", anchor_out,
                        "--method-timeout", str(a.method_timeout)], env=env, capture_output=True, text=True,
                       check=True)
        with open(anchor_out) as fh:
            torch_rounds.append(json.load(fh))
    ours = fastest_rounds(hesse_rounds)
    curvature = fastest_rounds(curvature_rounds) if curvature_rounds else None
    torch = fastest_rounds(torch_rounds)
    ratios = {}
    for w in a.only:
        mine = ours["workloads"].get(w, {})
        theirs = torch["workloads"].get(w, {}).get("methods", {})
        if w == "hvp_large":
            gradient = best(theirs, ["gradient"])
            hvp = best(theirs, [m for m in theirs if m.startswith("hvp_")])
            power = best(theirs, [m for m in theirs if m.startswith("power_iteration")])
            ratios[w] = {
                "gradient": compare(mine["gradient"], gradient),
                "hvp": compare(mine["hvp"], hvp),
                "power_iteration_20": compare(mine["power_iteration_20"], power),
                "ours_hvp_over_gradient": mine["hvp_over_gradient"],
            }
            steps = curvature["results"]["hvp_steps"]
            ratios["hvp_large_curvature"] = {
                "hvp": compare(steps["hvp"], hvp),
                "hvp_kept_graph_s": steps["hvp_kept_graph"]["median_s"],
                "ours_hvp_over_gradient": steps["hvp_over_gradient"],
                "ours_hvp_over_gradient_paired": steps.get("hvp_over_gradient_paired"),
                "power_iteration_20": compare(steps["power_iteration_20"], power),
                "lanczos_20": compare(steps["lanczos_20"], power),
                "top5_s": curvature["results"]["top5"]["top5"]["median_s"],
                "hutchinson_100_s": curvature["results"]["hutchinson_100"]["hutchinson"]["median_s"],
                "density_50_s": curvature["results"]["density_50"]["density"]["median_s"],
            }
        else:
            fastest = best(theirs)
            ratios[w] = compare(mine["timing"], fastest)
            ratios[w]["ours_peak_rss_mb"] = mine.get("peak_rss_mb")
            ratios[w]["torch_peak_rss_mb"] = fastest[1].get("peak_rss_mb")
            if "gemm_gflop" in mine:
                # the merged timing is the fastest round's, the rest the first
                # round's: the rate follows the timing, against the best dgemm
                achieved = mine["gemm_gflop"] / mine["timing"]["median_s"]
                dgemm = max(r["dgemm_gflops"] for r in hesse_rounds)
                mine["achieved_gflops"] = achieved
                ratios[w]["gemm_rate"] = {"achieved_gflops": achieved, "dgemm_gflops": dgemm,
                                          "fraction": achieved / dgemm}
    result = {"glibc_tunables": env.get("GLIBC_TUNABLES"), "rounds": a.rounds, "ratios": ratios, "hesse": ours,
              "hesse_curvature": curvature, "torch": torch}
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    json.dump(ratios, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
