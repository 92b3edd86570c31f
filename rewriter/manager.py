"""The pass manager: runs passes in order, times them, verifies after each one.

After every pass the rewritten model is run on the verification inputs and compared with
the model before that pass (so an error is attributed to the pass that made it):
exact passes at the dtype tolerance, approximate passes at their error budget,
architectural passes through their own ``check``. On a failure the manager bisects the
pass's sites (re-applying growing prefixes on a copy) and names the first failing site.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from rewriter.errors import BadInput, RewriterError
from rewriter.ir.view import GraphView
from rewriter.loader import FREEZE_HINT, freeze_initializer_inputs, initializer_inputs
from rewriter.pass_api import Kind, Pass, Site
from rewriter.run.verify import Runner, compare, reference_outputs

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclasses.dataclass
class PassRecord:
    name: str
    kind: Kind
    sites: list[Site]
    seconds: float
    verification: dict[str, Any] | None = None

    @property
    def applied(self) -> list[Site]:
        return [s for s in self.sites if s.accepted]

    @property
    def declined(self) -> list[Site]:
        return [s for s in self.sites if not s.accepted]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "applied": len(self.applied),
            "sites": [s.to_json() for s in self.applied],
            "declined": [{"site": s.site, "reason": s.reason} for s in self.declined],
            "seconds": round(self.seconds, 6),
            "verification": self.verification,
        }


def match_sites(p: Pass, view: GraphView) -> list[Site]:
    """``p.match(view)`` plus the control-flow sites. On a model whose initializers are also
    graph inputs (IR v3), a site that only such an input keeps from a pass (declined here,
    accepted with them frozen, matched on a copy) says so and names the flag that
    freezes them."""
    sites = p.match(view)
    if initializer_inputs(view) and (not sites or not all(s.accepted for s in sites)):
        try:
            frozen = view.copy()
            freeze_initializer_inputs(frozen)
            alt = {s.site: s for s in p.match(frozen) if s.accepted}
        except Exception as err:  # noqa: BLE001 - the hint is best effort, the decline stands
            log.debug("matching %s with frozen initializer inputs failed: %s", p.name, err)
            alt = {}
        seen = {s.site for s in sites}
        for s in sites:
            if not s.accepted and s.site in alt:
                s.reason = f"{s.reason}; {FREEZE_HINT}" if s.reason else FREEZE_HINT
        sites += [Site(name, False, f"{name}: a candidate only with constant initializers; {FREEZE_HINT}")
                  for name in alt if name not in seen]
    return sites + control_flow_sites(view)


def explain(view: GraphView, passes: list[Pass]) -> list[PassRecord]:
    """Match every pass in order, applying each (unverified) so later passes see the
    graph they would see in a real run; returns the sites."""
    records = []
    work = view.copy()
    for p in passes:
        t0 = time.perf_counter()
        sites = match_sites(p, work)
        p.apply(work, [s for s in sites if s.accepted])
        p.finish(work)
        work.finalize()
        records.append(PassRecord(p.name, p.kind, sites, time.perf_counter() - t0))
    return records


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def runtime_error(err: BaseException) -> str:
    """One line from a runtime failure: the node ONNX Runtime names (``Name:'...'``, or the
    node of an invalid-graph error) and its message, whitespace collapsed."""
    text = " ".join(str(err).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    node = re.search(r"Name:'([^']*)'", text) or re.search(r"[Nn]ode \(([^)\s]+)\)", text)
    msg = re.search(r"Status Message: (.*)", text)
    body = msg.group(1) if msg else text
    body = re.sub(r"^\S+\.(?:h|cc|cpp):\d+ [\w:~]+\([^)]*\)\s*", "", body)  # ORT's source location
    if len(body) > 400:
        body = body[:397] + "..."
    return (f"node {node.group(1)!r}: " if node else "") + f"{type(err).__name__}: {body}"


def _run_or_none(view: GraphView, feeds, why: list[str] | None = None) -> dict | None:
    try:
        return Runner(view)(feeds)
    except Exception as err:  # noqa: BLE001 - a rewritten model that does not run fails verification
        line = runtime_error(err)
        log.warning("the rewritten model does not run: %s", line)
        if why is not None:
            why.append(line)
        return None


def control_flow_sites(view: GraphView) -> list[Site]:
    """Control-flow nodes (If/Loop/Scan): their subgraphs are not rewritten; say so."""
    return [Site(n.name, False, f"control flow ({n.op.split(':')[-1]}): its subgraphs are not rewritten")
            for n in view.nodes() if n.op in ("other:If", "other:Loop", "other:Scan")]


def _apply(p: Pass, view: GraphView, sites: list[Site]) -> None:
    p.apply(view, sites)
    p.finish(view)
    view.finalize()


def run_passes(view: GraphView, passes: list[Pass], *, feeds: Mapping[str, np.ndarray] | None,
               progress: Progress | None = None) -> tuple[list[PassRecord], dict | None]:
    """Apply ``passes`` to ``view`` in place. ``feeds`` None skips verification.

    Returns the per-pass records and the outputs of the original model (the reference)."""
    say = progress or (lambda msg: None)
    records: list[PassRecord] = []
    reference = None
    if feeds is not None:
        say("running the original model")
        try:
            reference = reference_outputs(view, feeds)  # ORT's run of the user's file as given
        except RewriterError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's model does not run
            raise BadInput(f"the original model does not run, so no rewrite can be verified: "
                           f"{_first_line(err)} (--no-verify rewrites without verification)") from None
    current_ref = reference
    for p in passes:
        say(f"{p.name}: matching")
        t0 = time.perf_counter()
        sites = match_sites(p, view)
        accepted = [s for s in sites if s.accepted]
        before = view.copy() if (feeds is not None and accepted) else None
        say(f"{p.name}: applying {len(accepted)} site(s)")
        _apply(p, view, accepted)
        seconds = time.perf_counter() - t0
        rec = PassRecord(p.name, p.kind, sites, seconds)
        records.append(rec)
        if feeds is None or not accepted:
            continue
        say(f"{p.name}: verifying")
        if p.kind is Kind.ARCHITECTURAL:
            rec.verification = p.check(before, view, feeds)  # type: ignore[attr-defined]
            outs = Runner(view)(feeds)
        else:
            why: list[str] = []
            outs = _run_or_none(view, feeds, why)
            rec.verification = (compare(current_ref, outs, p.error_budget()) if outs is not None else
                                {"passed": False, "max_abs_error": float("inf"), "max_rel_error": float("inf"),
                                 "outputs": [], "runs": False,
                                 "error": f"the rewritten model does not run: {why[0] if why else '?'}"})
        if not rec.verification["passed"]:
            if p.kind is not Kind.ARCHITECTURAL and p.bisectable:
                rec.verification["failing_site"] = _bisect(p, before, accepted, feeds, current_ref, say)
            break
        current_ref = outs
    return records, reference


def _bisect(p: Pass, before: GraphView, accepted: list[Site], feeds, ref, say: Progress) -> str | None:
    """The first site whose application breaks verification, by bisection on prefixes."""
    if len(accepted) == 1:
        return accepted[0].site
    say(f"{p.name}: bisecting {len(accepted)} sites")
    names = [s.site for s in accepted]

    def fails(k: int) -> bool:
        work = before.copy()
        chosen = set(names[:k])
        sites = [s for s in p.match(work) if s.accepted and s.site in chosen]
        _apply(p, work, sites)
        outs = _run_or_none(work, feeds)
        return outs is None or not compare(ref, outs, p.error_budget())["passed"]

    lo, hi = 1, len(names)
    if not fails(hi):
        return None  # only the whole set fails (interaction between sites)
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return names[lo - 1]
