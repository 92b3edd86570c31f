"""The HTML report: self-contained, with both graphs, the latency chart, numerics and sites;
rendered by a real headless Chromium when one is installed (`make setup` installs it)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib

import pytest

from rewriter.cli import main
from tests._report_models import conv_bn

_BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    model = conv_bn(tmp / "m.onnx")
    html = tmp / "r.html"
    rc = main([str(model), "--passes", "foldnorm", "-o", str(tmp / "o.onnx"), "--bench", "--runs", "3",
               "--warmup", "1", "--html", str(html), "-q"])
    assert rc == 0
    return html


def test_page_is_self_contained(page):
    """No network: no external src/href, stylesheet link, @import or url(); only inline SVG/CSS."""
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<link" not in text and "@import" not in text and "url(http" not in text
    assert text.startswith("<!DOCTYPE html>")


def test_page_has_every_section(page):
    """Both graphs (with the rewritten nodes highlighted and provenance titles), latency bars,
    numerics and sites are in the page."""
    text = page.read_text()
    for ident in ('id="graph-before"', 'id="graph-after"', 'id="latency-summary"', 'id="latency-ops"',
                  'id="numerics"', 'id="sites"'):
        assert ident in text
    assert 'class="node removed" data-name="bn"' in text
    assert 'class="node changed" data-name="conv"' in text
    assert "pass: foldnorm" in text  # provenance on hover (<title>)


def _browser():
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _png_pixels(data: bytes):
    """Decode an 8-bit RGB/RGBA PNG into (width, height, channels, rows of bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    w = h = ctype = None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    ch = 3 if ctype == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), w * ch, [], bytearray(w * ch)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - ch] if i >= ch else 0
            b, c = prev[i], prev[i - ch] if i >= ch else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, ch, rows


def test_headless_chromium_renders_the_page(page, tmp_path):
    """A real headless Chromium loads the page offline: the DOM has both graph SVGs and the latency
    chart, and the screenshot is not blank."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium on PATH (make setup installs chromium-headless-shell from Debian)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--window-size=1200,1400"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90).stdout
    assert dom.count('class="graph-svg"') == 2 and 'id="latency-ops"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=90)
    w, h, ch, rows = _png_pixels(shot.read_bytes())
    sample = [tuple(r[x * ch:x * ch + 3]) for r in rows[::8] for x in range(0, w, 8)]
    non_white = sum(1 for p in sample if p != (255, 255, 255)) / len(sample)
    assert non_white > 0.02 and len(set(sample)) > 20
