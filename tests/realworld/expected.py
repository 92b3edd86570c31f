"""The expected outcome of every (architecture, exporter, pass) of the corpus, as data.

``applied``: the pass applies and the rewritten file is exact (independent ORT check);
``declined:<text>``: no site applies and a decline reason contains ``<text>``
(``a|b``: either); ``applied+declined:<text>``: applies to some sites and declines others
with that reason; ``none``: the file holds no candidate at all (said by a structural check
of the file in ``corpus.py``); ``error:<text>``: the tool refuses the file, one line
containing ``<text>``. Each expectation follows from the math of the pass and the architecture
(``docs/passes/``), never from what the tool does today.
"""

from __future__ import annotations

LMS = ("gpt2", "opt", "bloom", "llama", "qwen2", "neox")
VISION = ("vit", "deit", "dinov2")

PASSES: dict[str, tuple[str, ...]] = {
    **{a: ("rms", "crms", "lns", "osplus", "rettention") for a in LMS + VISION + ("bert", "dit", "pixart")},
    "convnext": ("rms", "crms", "lns", "osplus", "foldnorm"),
    "resnet": ("foldnorm",),
}
DIFFUSION = ("dit", "pixart")
PASSES["dit"] = PASSES["pixart"] = ("rms", "crms", "osplus", "rettention")

PRE_LN = ("gpt2", "opt", "bloom", "neox", "vit", "deit", "dinov2")
RMS_NATIVE = ("llama", "qwen2")

# A Shape / Size of the stream reads its shape, not its values: it must never block a site.
FORBIDDEN_IN_DECLINES = ("other:Shape", "other:Size")


def expected(arch: str, exporter: str, pass_name: str) -> str:
    """The correct outcome of ``pass_name`` on ``arch`` exported by ``exporter``."""
    p = pass_name
    if arch in PRE_LN and p in ("rms", "crms", "lns", "osplus"):
        # LN(x) == RMSNorm(x) for zero-mean x; every writer re-centres (BLOOM's embedding LN
        # and Dinov2's LayerScale included); OS+ shift/scale migrates into the linear readers
        return "applied"
    if arch in RMS_NATIVE:
        return {
            "rms": "declined:already an RMSNorm|is an RMSNorm on the stream",  # nothing to replace
            # RMSNorm(x) != RMSNorm(x - mean x): the stream cannot be re-centred, so no CRMS
            "crms": "declined:RMSNorm on the stream",
            "lns": "applied",  # the Curse-of-Depth models: both pre-norms of block l scaled
            "osplus": "applied",  # scale only (RMSNorm has no beta)
        }.get(p) or _attention(arch, exporter, p)
    if arch == "bert":  # post-LN: the norms sit on the stream itself
        return {"rms": "declined:post-LN", "crms": "declined:post-LN", "lns": "declined:post-LN",
                "osplus": "declined:post-LN|migration needs linear readers|stream norms only"}.get(p) \
            or _attention(arch, exporter, p)
    if arch == "convnext":
        return {
            # the block's LN reads the depthwise conv's output, the stream is read by convs
            "rms": "declined:no norm reads a residual stream",
            "crms": "declined:no norm reads a residual stream",
            "lns": "declined:not a pre-norm|no norm reads a residual stream",
            "osplus": "declined:stream norms only|no norm reads a residual stream",
            "foldnorm": "applied",  # the LayerScale (gamma * x) folds into pwconv2
        }[p]
    if arch == "resnet":
        # foldnorm: eval BatchNorm into the preceding conv. Both ONNX exporters fold every
        # BatchNorm into its conv themselves (eval mode), so their files hold none.
        return "applied" if exporter == "fx" else "none"
    if arch == "pixart" and exporter == "dynamo18":
        # the dynamo exporter writes a Squeeze of a 16-wide axis that ONNX Runtime rejects:
        # the tool must refuse the file in one line (nothing can be verified); the loader
        # asks ONNX Runtime to load the file as given first, and quotes its refusal
        return "error:ONNX Runtime cannot load the file"
    if arch in DIFFUSION:
        # adaLN-Zero / adaLN-single: branch outputs gated channel-wise by the timestep
        # embedding, norm outputs modulated by it (not read by linears only)
        # (PixArt: the cross-attention query reads the raw stream too, no norm before it)
        gate = "declined:data-dependent gate" + ("|is read by linear" if arch == "pixart" else "")
        return {"rms": gate, "crms": gate,
                "osplus": "declined:migration needs linear readers"}.get(p) or _attention(arch, exporter, p)
    return _attention(arch, exporter, p)


def _attention(arch: str, exporter: str, p: str) -> str:
    assert p == "rettention", (arch, p)
    if arch in PRE_LN[:4] + RMS_NATIVE:
        return "declined:causal|attention mask"  # decoders: causal attention over padded inputs
    if arch == "bert":
        return "declined:attention mask"
    if arch == "pixart":
        return "applied+declined:cross-attention"  # self-attention over image tokens; text keys
    return "applied"  # bidirectional self-attention without mask (ViT family, DiT)


EXPECTED = {(a, e, p): expected(a, e, p) for a in PASSES for e in ("ts14", "ts17", "dynamo18", "fx")
            for p in PASSES[a]}


def matches(want: str, outcome) -> tuple[bool, str]:
    """Whether an ``Outcome`` is the expected one, and why not."""
    bad = [r for r in outcome.declined for f in FORBIDDEN_IN_DECLINES if f in r]
    kind, _, text = want.partition(":")
    alts = [t for t in text.split("|") if t]
    if kind == "none":
        ok = outcome.status == "declined" and not outcome.declined
        return ok, "" if ok else f"expected no candidate site, got {outcome.summary()}"
    if kind == "error":
        ok = outcome.status == "error" and any(a in outcome.message for a in alts)
        return ok, "" if ok else f"expected the tool to refuse the file ({text}), got {outcome.summary()}"
    if kind in ("applied", "applied+declined"):
        if outcome.status != "applied":
            return False, f"expected applied, got {outcome.summary()}"
        if bad:
            return False, f"applied, but a shape-only read blocked a site: {bad[0]}"
        if kind == "applied+declined" and not any(a in r for r in outcome.declined for a in alts):
            return False, f"expected a site declined with {text!r}; declined: {outcome.declined}"
        return True, ""
    if outcome.status != "declined":
        return False, f"expected declined ({text}), got {outcome.summary()}"
    if not any(a in r for r in outcome.declined for a in alts):
        return False, f"declined, but not with {text!r}: {outcome.declined[:2]}"
    return True, ""
