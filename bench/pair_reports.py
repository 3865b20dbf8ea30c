"""Pair the rows of two compare reports made on the same split, user by user, without running
the expensive baselines again (RecBole's SASRec takes ~12 min on Amazon).

Refuses unless the ``--same`` models (baselines both reports ran) have identical per-user values
in both (then they were scored on the same split, masking and metric code), and prints each model of the new report
against a reference model of either report, with paired bootstrap 95% intervals
(``pagellm.eval.paired.paired_difference``). Exact command behind docs/results/amazon2014/README.md:

    python bench/pair_reports.py --new docs/results/amazon2014/compare_cooc/users.parquet \\
        --old docs/results/amazon2014/compare_next_item/users.parquet --reference recbole:SASRec \\
        --same popularity itemknn multivae sasrec --out docs/results/amazon2014/compare_cooc/paired_with_compare_next_item.json
    python bench/pair_reports.py --new docs/results/amazon2014/compare_cooc_seeds/users.parquet \\
        --old docs/results/amazon2014/compare_next_item/users.parquet --reference recbole:SASRec \\
        --same popularity --out docs/results/amazon2014/compare_cooc_seeds/paired_with_compare_next_item.json
"""

from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from pagellm.eval.paired import identical, paired_difference


def per_model(path: str) -> dict[str, pd.DataFrame]:
    users = pd.read_parquet(path)
    return {m: g.set_index("user_id").drop(columns="model").sort_index() for m, g in users.groupby("model", sort=False)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", required=True, help="users.parquet of the new compare report")
    p.add_argument("--old", required=True, help="users.parquet of an earlier report on the same split")
    p.add_argument("--reference", required=True, help="the model every row is measured against")
    p.add_argument("--same", nargs="+", required=True, help="models both reports ran, checked user by user")
    p.add_argument("--out", help="write the differences here as JSON")
    args = p.parse_args()
    new, old = per_model(args.new), per_model(args.old)
    shared = args.same
    for model in shared:
        if model not in new or model not in old:
            sys.exit(f"--same {model}: not in both reports")
        if not identical(new[model], old[model]):
            sys.exit(f"{model}: per-user values differ between {args.new} and {args.old}: not the same split")
    models = {**old, **new}
    if args.reference not in models:
        sys.exit(f"--reference {args.reference!r} is in neither report (models: {sorted(models)})")
    reference = models[args.reference]
    report = {
        "reference": args.reference,
        "identical_in_both": shared,
        "against_reference": {m: paired_difference(f, reference) for m, f in new.items() if m != args.reference},
    }
    print(f"identical per-user values in both reports: {', '.join(shared) or 'none'}")
    for m, d in report["against_reference"].items():
        print(
            f"{m:>14} - {args.reference}: ndcg@100 {d['ndcg@100']['mean']:+.4f} "
            f"[{d['ndcg@100']['ci95'][0]:+.4f}, {d['ndcg@100']['ci95'][1]:+.4f}], "
            f"recall@20 {d['recall@20']['mean']:+.4f} [{d['recall@20']['ci95'][0]:+.4f}, {d['recall@20']['ci95'][1]:+.4f}] "
            f"({d['users']} users)"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
