"""Writes banner.png, the Comfy Registry banner ([tool.comfy] Banner in pyproject.toml): 1680x720
(21:9), from the pack's own images (the embedded miniature model's test samples in
docs/miniature/report_samples.png: product, then its TR2I result). Maintainer tool, not run by CI.

    .venv/bin/python scripts/make_banner.py

Fonts: DejaVu Sans (Latin) and WenQuanYi Zen Hei (Chinese), as Debian installs them
(apt-get install fonts-dejavu-core fonts-wqy-zenhei).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "docs" / "miniature" / "report_samples.png"  # 4 columns of 128 px tiles under an 18 px header
OUT = REPO / "banner.png"
SIZE = (1680, 720)
BACKGROUND = (24, 27, 38)
LATIN = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
LATIN_BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
CHINESE = "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"
TILE, HEADER, ROWS = 128, 18, (0, 1, 3)  # sample rows: cube, jar, mug
PRODUCT_COL, RESULT_COL = 0, 3  # product, tr2i


def tile(sheet: Image.Image, row: int, col: int, side: int) -> Image.Image:
    box = (col * TILE, HEADER + row * TILE, (col + 1) * TILE, HEADER + (row + 1) * TILE)
    return sheet.crop(box).resize((side, side), Image.LANCZOS)


def main() -> None:
    sheet = Image.open(SAMPLES).convert("RGB")
    banner = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(banner)
    side, gap, drop = 210, 22, 100  # tiles: products on top, results below, an arrow between
    left = SIZE[0] - 3 * side - 2 * gap - 70
    top = (SIZE[1] - 2 * side - drop) // 2
    lines = [("DreamPainter", ImageFont.truetype(LATIN_BOLD, 92), (245, 245, 250), 0),
             ("Keep the product. Paint a new background.", ImageFont.truetype(LATIN, 32), (200, 205, 220), 150),
             ("保留商品，重绘背景", ImageFont.truetype(CHINESE, 42), (200, 205, 220), 205),
             ("ComfyUI nodes  ·  CogView4-6B  ·  prompt + reference image", ImageFont.truetype(LATIN, 22),
              (130, 140, 165), 300)]
    for text, font, colour, dy in lines:
        assert 80 + draw.textlength(text, font=font) < left - 40, f"text too wide for the banner: {text}"
        draw.text((80, 190 + dy), text, font=font, fill=colour)
    arrow = ImageFont.truetype(LATIN_BOLD, 40)
    for i, row in enumerate(ROWS):
        x = left + i * (side + gap)
        banner.paste(tile(sheet, row, PRODUCT_COL, side), (x, top))
        banner.paste(tile(sheet, row, RESULT_COL, side), (x, top + side + drop))
        draw.text((x + side // 2, top + side + drop // 2), "↓", font=arrow, fill=(130, 140, 165), anchor="mm")
    banner.save(OUT, optimize=True)
    print(f"wrote {OUT.relative_to(REPO)} {banner.size}, {OUT.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
