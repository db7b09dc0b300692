"""Pictures: image grids with optional row/column labels."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def image_grid(
    images: list[Image.Image],
    columns: int,
    row_labels: list[str] | None = None,
    column_labels: list[str] | None = None,
    scale: int = 1,
    pad: int = 2,
) -> Image.Image:
    """Lay images out in a grid (row-major); labels are drawn left of rows / above columns."""
    if not images:
        raise ValueError("no images to lay out")
    width, height = images[0].size
    width, height = width * scale, height * scale
    rows = (len(images) + columns - 1) // columns
    font = ImageFont.load_default()
    left = max((int(font.getlength(t)) for t in row_labels or []), default=-pad) + pad * 2
    top = 14 if column_labels else 0
    canvas = Image.new("RGB", (left + columns * (width + pad), top + rows * (height + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        tile = image.convert("RGB").resize((width, height), Image.Resampling.NEAREST)
        canvas.paste(tile, (left + column * (width + pad), top + row * (height + pad)))
    for row, label in enumerate(row_labels or []):
        draw.text((pad, top + row * (height + pad) + height // 2 - 5), label, fill="black", font=font)
    for column, label in enumerate(column_labels or []):
        draw.text((left + column * (width + pad) + 2, 1), label[: max(4, width // 6)], fill="black", font=font)
    return canvas
