"""The data commands of ``bcc``: ``intake``, ``demo-data`` (synthetic tiles in patient folders, optionally a
separate holdout set) and ``holdout freeze|extend|show`` (the frozen holdout; the logic is in
:mod:`bcc_pipeline.holdout`, this module only parses and prints)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import DEFAULTS
from ..display import one_line
from ..files import mark_home
from .common import add_decision_args, emit, progress, settings

__all__ = ["register"]


def cmd_intake(args: argparse.Namespace) -> int:
    from ..pipelines import intake_step

    s = settings(args)
    r = intake_step(s, progress=progress)

    def human() -> None:
        print(
            f"intake {r['run_id']}: {r['accepted']} accepted, {r['duplicates']} duplicates, "
            f"{r['conflicts']} label conflicts, {r['rejected']} rejected, {r['ignored']} ignored, "
            f"{r['skipped']} still being written, {r['changed']} changed after they were read, "
            f"{r['move_failed']} could not be quarantined"
        )
        if r["recovered"]:
            print(f"  finished {r['recovered']} quarantine move(s) of interrupted runs")
        for rej in r["rejections"]:
            print(f"  rejected {rej['path']}: {rej['reason']}")
        for f in r["failed"]:
            print(f"  left in landing {f['path']}: {f['error']}")
        if r.get("contested_holdout"):
            print(
                f"  {len(r['contested_holdout'])} holdout image(s) now have a contested label: see "
                "`bcc holdout show`, and `bcc holdout withdraw --contested --reason ...`"
            )

    emit(args, r, human)
    if r["unreachable"]:
        paths = "; ".join(f"{u['path']} ({u['error']})" for u in r["unreachable"][:10])
        print(
            f"bcc: error: {len(r['unreachable'])} path(s) in landing are not taken in as things are: {paths}",
            file=sys.stderr,
        )
        return 1
    stuck = r["persistent_move_failures"]
    if stuck:
        paths = ", ".join(f["path"] for f in stuck[:10])
        print(
            f"bcc: error: {len(stuck)} file(s) could not be quarantined in more than one attempt and are "
            f"still in landing: {paths}",
            file=sys.stderr,
        )
        return 1
    if r["move_failed"]:
        print(
            f"bcc: warning: {r['move_failed']} file(s) could not be quarantined and are still in landing "
            "(listed under failed); the next run tries again",
            file=sys.stderr,
        )
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from ..demo_data import HOLDOUT_SEED_OFFSET, generate, patients_for

    s = settings(args)
    out = Path(args.out) if args.out else s.landing_dir
    if not args.out:
        mark_home(s.home)  # the home has a landing/ now: never scored as an inbox
    t0 = time.monotonic()
    groups = patients_for(max(args.benign, args.malignant)) if args.groups is None else args.groups
    result = generate(
        out,
        benign=args.benign,
        malignant=args.malignant,
        size=args.size,
        seed=s.seed,
        groups=groups,
        first_patient=args.first_patient,
    )
    payload = {k: v for k, v in result.items() if k != "files"}
    payload["n_files"] = len(result.get("files", []))
    text = (
        f"wrote {payload['n_files']} synthetic H&E-like tiles ({result['benign']} benign, "
        f"{result['malignant']} malignant, {result['patients']} patient folders) to {out}"
    )
    if args.holdout_out:  # other patients (ids after the ones above), other draws (another seed)
        hb = args.holdout // 2
        h = generate(
            Path(args.holdout_out),
            benign=hb,
            malignant=args.holdout - hb,
            size=args.size,
            seed=s.seed + HOLDOUT_SEED_OFFSET,
            groups=patients_for(args.holdout - hb),
            first_patient=args.first_patient + result["patients"],
        )
        payload["holdout"] = {k: v for k, v in h.items() if k != "files"}
        payload["holdout"]["n_files"] = len(h["files"])
        text += (
            f"\nwrote {len(h['files'])} holdout tiles ({h['benign']} benign, {h['malignant']} malignant, "
            f"{h['patients']} other patients) to {args.holdout_out}"
        )
    payload["seconds"] = round(time.monotonic() - t0, 1)
    emit(args, payload, text)
    return 0


def _actor(args: argparse.Namespace) -> str:
    from ..registry import default_actor

    return args.actor or default_actor()


def _print_show(info: dict[str, Any]) -> None:
    if info["hash"] is None:
        print(
            "no holdout yet: `bcc holdout freeze --reason ...` chooses one from the labelled store, "
            "`bcc holdout extend --from FOLDER --reason ...` takes one from a folder, and the first split "
            "freezes one by itself (BCC_HOLDOUT_FRACTION)"
        )
        return
    counts = ", ".join(f"{n} {lab} ({info['n_groups'][lab]} groups)" for lab, n in info["counts"].items())
    print(f"holdout {info['hash']}\n  {info['n']} images: {counts}\n  manifest {info['path']}")
    print(
        "  per group: "
        + ", ".join(
            # quoted: a folder named `m1 1 malignant, h2` is one group, not two
            f"{one_line(json.dumps(g, ensure_ascii=False))} {'/'.join(f'{n} {lab}' for lab, n in c.items())}"
            for g, c in list(info["groups"].items())[:20]
        )
        + (f", ... ({len(info['groups'])} groups)" if len(info["groups"]) > 20 else "")
    )
    if info["excluded"]:
        print(f"  kept out ({len(info['excluded'])}):")
        for x in info["excluded"]:
            print(f"    {one_line(x['source'])}: {one_line(x['reason'])}")
    if info["contested"]:
        print(
            f"  LABEL CONTESTED ({len(info['contested'])}): metrics on this holdout still count these under "
            "their holdout label; `bcc holdout withdraw --contested --reason ...` takes them out (logged)"
        )
        for c in info["contested"]:
            print(f"    {c['sha256'][:16]} (holdout label {c['label']}): {one_line(c['reason'])}")
    print("history:")
    for e in info["history"]:
        old = (e["old_hash"] or "none")[:12]
        print(
            f"  #{e['seq']} {e['at']} {e['action']} by {one_line(e['actor'])}: {old} -> {e['new_hash'][:12]}, "
            f"{e['n_before']} -> {e['n_after']} images, {e['n_excluded']} kept out; reason: {one_line(e['reason'])}"
        )


def _change(args: argparse.Namespace, manifest: Any) -> int:
    from ..holdout import describe_holdout

    info = describe_holdout(settings(args))
    refused = [x for x in manifest.refused if not x.get("ignored")]
    if args.json:
        json.dump(
            {**info, "not_added": refused, "ignored": [x for x in manifest.refused if x.get("ignored")]},
            sys.stdout,
            indent=2,
            default=str,
        )
        sys.stdout.write("\n")
    else:
        last = info["history"][-1]
        print(
            f"holdout {last['action']}: {manifest.hash} ({last['n_before']} -> {last['n_after']} images, "
            f"{last['n_excluded']} kept out)"
        )
        for x in info["excluded"]:
            if x.get("change") == last["seq"]:
                print(f"  kept out {one_line(x['source'])}: {one_line(x['reason'])}")
        for x in manifest.refused:
            print(
                f"  {'ignored' if x.get('ignored') else 'NOT ADDED'} {one_line(x['path'])}: {one_line(x['reason'])}"
            )
    if refused:  # the change is logged without them; somebody has to look (a `Malignant/` folder, say)
        print(
            f"bcc: error: {len(refused)} path(s) of the folder were not added to the holdout (listed as NOT "
            "ADDED); the change was made without them",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_freeze(args: argparse.Namespace) -> int:
    from ..holdout import freeze_holdout

    s = settings(args)
    fraction = s.holdout_fraction if args.fraction is None else args.fraction
    return _change(args, freeze_holdout(s, fraction=fraction, actor=_actor(args), reason=args.reason))


def cmd_extend(args: argparse.Namespace) -> int:
    from ..holdout import extend_holdout

    s = settings(args)
    return _change(args, extend_holdout(s, args.source, actor=_actor(args), reason=args.reason))


def cmd_withdraw(args: argparse.Namespace) -> int:
    from ..holdout import withdraw_from_holdout

    s = settings(args)
    return _change(
        args,
        withdraw_from_holdout(s, args.shas, contested=args.contested, actor=_actor(args), reason=args.reason),
    )


def cmd_show(args: argparse.Namespace) -> int:
    from ..holdout import describe_holdout

    info = describe_holdout(settings(args))
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        _print_show(info)
    return 0


def register(sub: Any, add: Any) -> None:
    sp = add(
        "demo-data",
        cmd_demo_data,
        "write synthetic H&E-like demo tiles (benign/malignant) in patient "
        "folders, and optionally a separate holdout set",
    )
    sp.add_argument("--out", help="output folder (default: $BCC_HOME/landing)")
    sp.add_argument("--benign", type=int, default=112, help="number of benign tiles (112)")
    sp.add_argument("--malignant", type=int, default=127, help="number of malignant tiles (127)")
    sp.add_argument("--size", type=int, default=224, help="tile size in pixels (224)")
    sp.add_argument(
        "--groups",
        type=int,
        help="patient folders per label (default: about 5 tiles per patient; 0: no patient folders)",
    )
    sp.add_argument("--first-patient", type=int, default=1, help="number of the first patient folder (1)")
    sp.add_argument(
        "--holdout-out", help="also write a separate holdout set of other patients to this folder"
    )
    sp.add_argument(
        "--holdout", type=int, default=300, help="tiles in the holdout set, half of each label (300)"
    )
    sp.add_argument("--seed", type=int, help=f"random seed (default: BCC_SEED or {DEFAULTS['seed']})")

    hp = sub.add_parser(
        "holdout", help="the frozen holdout: show it, freeze it once, extend it, withdraw images (logged)"
    )
    hsub = hp.add_subparsers(dest="holdout_command", required=True, metavar="ACTION")

    def action(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sp = hsub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true", help="print one JSON document")
        return sp

    sp = action(
        "freeze",
        cmd_freeze,
        "choose the holdout once from the labelled store (by patient group, "
        "stratified); refused when one exists",
    )
    sp.add_argument("--fraction", type=float, help="share of each label (default: BCC_HOLDOUT_FRACTION)")
    add_decision_args(sp, "holdout")
    sp = action(
        "extend",
        cmd_extend,
        "add labelled images from FOLDER/<label>/[<group>/] to the holdout; they never enter development",
    )
    sp.add_argument(
        "--from", dest="source", required=True, metavar="FOLDER", help="folder laid out like landing/"
    )
    add_decision_args(sp, "holdout")
    sp = action(
        "withdraw",
        cmd_withdraw,
        "take images out of the holdout (kept out from then on): by sha256, or those whose label is contested",
    )
    sp.add_argument("shas", nargs="*", metavar="SHA256", help="at least 12 characters of each image's sha256")
    sp.add_argument(
        "--contested", action="store_true", help="every image whose label intake saw contested (holdout show)"
    )
    add_decision_args(sp, "holdout")
    action(
        "show",
        cmd_show,
        "the holdout: hash, counts per label and group, images kept out or contested, change history",
    )

    add("intake", cmd_intake, "take labelled images from landing/ into the dataset store")
