"""Prints the parity results table; exits 1 if any check failed (or none ran).

    report.py RESULTS.jsonl SECONDS [DISK_LINE]   (run.sh passes its peak-disk-use line last)
"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'check':30s} {'component':24s} {'max abs diff':>12s} {'max |ref|':>10s} {'rel':>9s} {'tol':>7s}  result")
for r in rows:
    nums = ("{:12.2e} {:10.3f} {:9.2e} {:7.0e}".format(r["max_abs"], r["max_ref"], r["rel"], r["tol"]) if r["rel"] is not None else f"{'':12s} {'':10s} {'':9s} {'':7s}")
    print(f"{r['check']:30s} {r['component']:24s} {nums}  {'PASS' if r['ok'] else 'FAIL'}  {r['note']}")
failed = sum(not r["ok"] for r in rows)
print(f"\nparity: {len(rows) - failed} passed, {failed} failed in {sys.argv[2]} s")
if len(sys.argv) > 3:
    print(sys.argv[3])
sys.exit(1 if failed or not rows else 0)
