#!/usr/bin/env python3
"""Tables, JSON and a chart from tools/bench-clone-guest.sh's output (benchmark only).

Usage: bench-clone-report.py GUEST_OUTPUT JSON_OUT PNG_OUT COMMAND
       bench-clone-report.py --markdown JSON   the README's table of a run's JSON

A ratio is the median over rounds of the ratio within a round (the devices of a round run
back to back, so slow drift of the host cancels out). Ours costs less than dm-clone on a row
when ours / rublk loop >= dm-clone / kernel loop: each clone against the bare device of its
own kind (a ublk device, a kernel block device) over the same stack.
"""
import datetime
import json
import statistics
import sys

NAMES = {
    "randread": "4k randread qd32",
    "seqwrite": "1M seq write qd8",
    "fsync": "4k randwrite+fdatasync qd1",
    "randwrite": "4k randwrite qd32",
    "seqread": "1M seq read, whole device",
}


def load(path):
    meas, hyd, notes = [], [], []
    for line in open(path, errors="replace"):
        line = line.strip()
        if line.startswith("M {"):
            meas.append(json.loads(line[2:]))
        elif line.startswith("H {"):
            hyd.append(json.loads(line[2:]))
        elif line.startswith("NOTE "):
            notes.append(line[5:])
    return meas, hyd, notes


def ratio(meas, region, profile, a, b):
    """Median over rounds of a's IOPS / b's IOPS; None when either is missing."""
    by = {}
    for m in meas:
        if m["region"] == region and m["profile"] == profile:
            by.setdefault(m["round"], {})[m["dev"]] = m
    rs = [r[a]["iops"] / r[b]["iops"] for r in by.values() if a in r and b in r and r[b]["iops"] > 0]
    return statistics.median(rs) if rs else None


def med(meas, region, profile, dev, key):
    v = [m[key] for m in meas if m["region"] == region and m["profile"] == profile and m["dev"] == dev]
    return statistics.median(v) if v else None


def markdown(path):
    """The README's table: one row per profile and state, both region sizes side by side."""
    report = json.load(open(path))
    regions = list(report["tables"])
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"
    head = "| profile | state |" + "".join(f" {r}: ours/rublk | {r}: dm/kloop |" for r in regions)
    print(head)
    print("|" + "---|" * (2 + 2 * len(regions)))
    rows = report["tables"][regions[0]]
    for i, row in enumerate(rows):
        cells = []
        for r in regions:
            x = report["tables"][r][i]
            o = fmt(x["ours_over_rublk"])
            # A row where ours does not cost less than dm-clone is in bold.
            cells += [f"**{o}**" if x["verdict"] == "MISSED" else o, fmt(x["dm_over_kloop"])]
        print(f"| {NAMES[row['profile']]} | {row['state']} | " + " | ".join(cells) + " |")
    less = sum(x["verdict"] == "ours less" for r in regions for x in report["tables"][r])
    total = sum(x["verdict"] != "-" for r in regions for x in report["tables"][r])
    print(f"\nours costs less than dm-clone in {less} of {total} rows")


def main():
    if sys.argv[1] == "--markdown":
        return markdown(sys.argv[2])
    src, json_out, png_out, command = sys.argv[1:5]
    meas, hyd, notes = load(src)
    regions = list(dict.fromkeys(m["region"] for m in meas))
    profiles = [p for p in NAMES if any(m["profile"] == p for m in meas)]
    report = {"date": datetime.date.today().isoformat(), "command": command, "notes": notes,
              "tables": {}, "hydration_under_load": hyd, "targets": []}
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"
    for region in regions:
        rows = []
        print(f"\nregion size {region} ({command})")
        print(f"{'profile':28} {'state':8} {'ours/rublk':>11} {'dm/kloop':>9}  verdict   "
              f"{'p99 ours':>9} {'p99 dm':>9} {'p99 rublk':>9} {'p99 kloop':>9} (us)")
        for p in profiles:
            for state in ("hydrated", "cold"):
                ours = "ubchyd" if state == "hydrated" else "ubccold"
                dm = "dmhyd" if state == "hydrated" else "dmcold"
                o = ratio(meas, region, p, ours, "rublk")
                d = ratio(meas, region, p, dm, "kloop")
                verdict = "-" if o is None or d is None else ("ours less" if o >= d else "MISSED")
                lat = {k: med(meas, region, p, k, "p99_us") for k in (ours, dm, "rublk", "kloop")}
                row = {"profile": p, "state": state, "ours_over_rublk": o, "dm_over_kloop": d,
                       "verdict": verdict,
                       "iops": {k: med(meas, region, p, k, "iops") for k in (ours, dm, "rublk", "kloop")},
                       "p50_us": {k: med(meas, region, p, k, "p50_us") for k in (ours, dm, "rublk", "kloop")},
                       "p99_us": lat,
                       "p999_us": {k: med(meas, region, p, k, "p999_us") for k in (ours, dm, "rublk", "kloop")}}
                rows.append(row)
                f = lambda x: "-" if x is None else f"{x:.0f}"
                print(f"{NAMES[p]:28} {state:8} {fmt(o):>11} {fmt(d):>9}  {verdict:9} "
                      f"{f(lat[ours]):>9} {f(lat[dm]):>9} {f(lat['rublk']):>9} {f(lat['kloop']):>9}")
        report["tables"][region] = rows
        # The issue's own targets for this region size.
        cold_w = med(meas, region, "seqwrite", "ubccold", "iops")
        hyd_w = med(meas, region, "seqwrite", "ubchyd", "iops")
        if cold_w and hyd_w and region.upper().startswith("64"):
            report["targets"].append({"target": f"cold 1M seq write >= 0.9x hydrated ({region})",
                                      "value": cold_w / hyd_w, "met": cold_w / hyd_w >= 0.9})
        c = ratio(meas, region, "fsync", "ubccold", "rublk")
        if c is not None:
            report["targets"].append({"target": f"cold 4k randwrite+fdatasync >= 0.5x rublk loop ({region})",
                                      "value": c, "met": c >= 0.5})
    if hyd:
        print("\nhydration under load (fio 4k randrw qd8 on a hydrating clone):")
        for h in hyd:
            rate = h["bytes"] / h["seconds"] if h["seconds"] else 0
            frac = h["iops"] / h["iops_unloaded"] if h["iops_unloaded"] else 0
            # Runs before this baseline was added measured unloaded on the hydrated clone only.
            hyd_base = h.get("iops_hydrated")
            vs_hyd = f", {h['iops'] / hyd_base:.2f}x of the hydrated clone's" if hyd_base else ""
            lim = f", {rate / h['rate_limit']:.0%} of the {h['rate_limit'] >> 20} MiB/s limit" if h["rate_limit"] else " (no rate limit)"
            # Ours runs with each hydration policy (`--hydrate-when`; runs before it had one,
            # `always`).
            policy = h.get("policy", "always") if h["dev"] == "ubc" else ""
            who = f"ublk-clone {policy}" if h["dev"] == "ubc" else "dm-clone"
            print(f"  {who:17} region {h['region']}: hydrated {rate / 2**20:.1f} MiB/s{lim}; "
                  f"fio {h['iops']:.0f} IOPS, {frac:.2f}x of the same fio on a "
                  f"{'cold clone without hydration' if hyd_base else 'hydrated clone'}{vs_hyd}")
            if h["rate_limit"] and policy == "always":
                # Judged for the default policy (`idle` trades the rate for the load, by
                # design). The baseline is the same fio on the hydrated clone; the cold clone
                # without hydration (same state, no copying) is shown beside it.
                base = h["iops"] / hyd_base if hyd_base else frac
                ok = rate / h["rate_limit"] >= 0.5 and base >= 0.8
                report["targets"].append({"target": f"hydration under load >= 50% of the limit with fio >= 0.8x of the hydrated clone's (cold clone's beside it) ({h['region']}, {policy})",
                                          "value": [round(rate / h["rate_limit"], 3), round(base, 3), round(frac, 3)], "met": ok})
    print("\ntargets:")
    for t in report["targets"]:
        v = t["value"]
        v = ", ".join(f"{x:.2f}" for x in v) if isinstance(v, list) else f"{v:.2f}"
        print(f"  {t['target']}: {v}: {'met' if t['met'] else 'MISSED'}")
    for n in notes:
        print(f"note: {n}")
    with open(json_out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nJSON: {json_out}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no chart")
        return
    fig, axes = plt.subplots(1, len(regions), figsize=(7 * len(regions), 5), squeeze=False)
    for ax, region in zip(axes[0], regions):
        rows = report["tables"][region]
        labels = [f"{NAMES[r['profile']]}\n{r['state']}" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["ours_over_rublk"] or 0 for r in rows], 0.4, label="ublk-clone / rublk loop")
        ax.bar([x + 0.2 for x in xs], [r["dm_over_kloop"] or 0 for r in rows], 0.4, label="dm-clone / kernel loop")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"region size {region}: each clone over its bare device")
        ax.set_ylabel("IOPS ratio (higher: the clone costs less)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{command}, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_out, dpi=90)
    print(f"chart: {png_out}")


if __name__ == "__main__":
    main()
