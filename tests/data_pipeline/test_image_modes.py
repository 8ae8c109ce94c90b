"""Images as collections hold them: CMYK and progressive JPEGs, grey, palette, alpha and 16-bit PNGs, 16-bit TIFF, WebP,
and phone photos stored sideways with an EXIF orientation. The training views (DALI) and every PIL path (evaluation,
search, embed, attention, contact sheets, the CPU augmenter) must see the same upright picture: DALI applies the
orientation and scales 16 bits to 8, and so must PIL (data_pipeline.sources.open_image), whose plain ``convert`` would
leave the photo sideways and clip a 16-bit image to white."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from data_pipeline.cpu import PilAugmenter
from data_pipeline.dali import DaliAugmenter
from data_pipeline.sources import open_image, pil_decodes
from data_pipeline.views import AugmentConfig

PHOTO = Image.fromarray(load_sample_image("china.jpg"))  # 640x427, RGB
SIZE = 64
# how orientation o is undone: the photo is stored turned by the inverse, so that applying o gives it back upright
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def _png16_rgb(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), written chunk by chunk."""
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(PHOTO.transpose(STORED_AS[orientation]), "JPEG", quality=95, exif=exif.tobytes())


GREY16 = np.asarray(PHOTO.convert("L")).astype(np.uint16) * 257
CASES = {  # name: (encoded bytes, what it shows: "colour" = the photo, "grey" = the photo in grey)
    "cmyk_jpeg": (_encode(PHOTO.convert("CMYK"), "JPEG", quality=95), "colour"),
    "progressive_jpeg": (_encode(PHOTO, "JPEG", quality=95, progressive=True), "colour"),
    "grey_jpeg": (_encode(PHOTO.convert("L"), "JPEG", quality=95), "grey"),
    "grey16_png": (_encode(Image.fromarray(GREY16), "PNG"), "grey"),
    "grey16_tiff": (_encode(Image.fromarray(GREY16), "TIFF"), "grey"),
    "float_tiff": (_encode(Image.fromarray(GREY16.astype(np.float32) / 65535, "F"), "TIFF"), "grey"),  # 0..1
    "rgb16_png": (_png16_rgb(np.asarray(PHOTO).astype(np.uint16) * 257), "colour"),
    "rgba_png": (_encode(PHOTO.convert("RGBA"), "PNG"), "colour"),
    "palette_png": (_encode(PHOTO.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "colour"),
    "grey_alpha_png": (_encode(PHOTO.convert("LA"), "PNG"), "grey"),
    "webp": (_encode(PHOTO, "WEBP", quality=95), "colour"),
    **{f"exif{o}_jpeg": (_exif_jpeg(o), "colour") for o in STORED_AS},
}


@pytest.fixture(scope="module")
def decoders():
    """The training views' decoder (DALI on CPU) and the PIL one, each a plain resize to SIZE, values in [0, 1]."""
    aug = AugmentConfig.disabled(mean=[0.0], std=[1.0])
    dali = DaliAugmenter(aug, batch_size=1, image_size=SIZE, channels=3, num_views=1, device="cpu", device_id=None)
    pil = PilAugmenter(aug, image_size=SIZE, channels=3, num_views=1)
    yield dali, pil
    pil.close()


@pytest.fixture(scope="module")
def references(decoders):
    """What each kind of case should show, decoded from lossless PNGs of the photo and of its grey version."""
    _, pil = decoders
    return {"colour": pil([_encode(PHOTO, "PNG")])[0], "grey": pil([_encode(PHOTO.convert("L"), "PNG")])[0]}


@pytest.mark.parametrize("name", list(CASES))
def test_dali_and_pil_see_the_same_upright_picture(decoders, references, name):
    """Each case through DALI and through PIL: the two agree to within JPEG's and the resizers' noise (mean 0.01 of
    the [0, 1] range; a sideways photo differs by ~0.37, a 16-bit image clipped to white by ~0.43) and both show the
    photo upright and as bright as it is."""
    data, shows = CASES[name]
    dali, pil = decoders
    seen_by_dali, seen_by_pil = dali([data])[0], pil([data])[0]
    assert seen_by_dali.shape == seen_by_pil.shape == (1, 3, SIZE, SIZE)
    assert (seen_by_dali - seen_by_pil).abs().mean().item() < 0.01
    for seen in (seen_by_dali, seen_by_pil):
        assert (seen - references[shows]).abs().mean().item() < 0.01


def test_open_image_turns_and_scales():
    """open_image itself: a sideways-stored photo comes back at the upright size with its orientation tag gone, a
    16-bit grey image as 8-bit grey of the same values / 257, an ordinary one as it is."""
    upright = open_image(_exif_jpeg(6))
    assert upright.size == PHOTO.size and upright.getexif().get(0x0112) is None
    grey = open_image(CASES["grey16_png"][0])
    assert grey.mode == "L" and (np.asarray(grey) == np.asarray(PHOTO.convert("L"))).all()
    plain = open_image(_encode(PHOTO, "PNG"))
    assert plain.mode == "RGB" and np.array_equal(np.asarray(plain), np.asarray(PHOTO))


def test_formats_training_cannot_decode_are_undecodable_everywhere(decoders, tmp_path):
    """A GIF named .png (web crawls are full of them): DALI cannot decode it, so training skips it; PIL could, but
    evaluation, search and `data verify --decode` must not count it as an image training reads: all three refuse it,
    and `data shards` leaves it out."""
    from data_pipeline.dali import CorruptBatch
    from data_pipeline.shards import index_shards, read_manifest, verify_dataset, write_shards
    from data_pipeline.sources import pil_decodes

    gif = _encode(PHOTO.convert("P"), "GIF")
    dali, pil = decoders
    with pytest.raises(CorruptBatch):
        dali([gif])
    with pytest.raises(ValueError, match=r"^a GIF image, which the training pipeline \(DALI\) does not decode$"):
        pil([gif])
    assert not pil_decodes(gif) and pil_decodes(CASES["webp"][0])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "photo.png").write_bytes(_encode(PHOTO, "PNG"))
    (tmp_path / "imgs" / "animation.png").write_bytes(gif)
    # `data shards` reads its header and leaves it out, noted (training had skipped it every epoch) ...
    write_shards(f"images:{tmp_path / 'imgs'}", tmp_path / "ds", progress=False)
    table = read_manifest(tmp_path / "ds")
    assert table.num_rows == 1 and json.loads(table.schema.metadata[b"left_out"]) == [
        f"1 file(s) that are no image training decodes, e.g. {tmp_path / 'imgs' / 'animation.png'} (a GIF image, which "
        "DALI does not decode)"]
    # ... so does `data index` of tars another tool wrote, with a `problem:` line ...
    import webdataset as wds

    from data_pipeline.shards import sha256_file

    def tar(animation: bytes) -> None:
        with wds.TarWriter(str(tmp_path / "tars" / "a.tar")) as sink:
            sink.write({"__key__": "photo", "png": _encode(PHOTO, "PNG")})
            sink.write({"__key__": "animation", "png": animation})

    (tmp_path / "tars").mkdir()
    tar(gif)
    _, counts = index_shards(tmp_path / "tars", progress=False)
    assert counts["problems"] == ["a.tar: sample 'animation' left out (a GIF image, which DALI does not decode)"]
    # ... and `data verify --decode` finds one put into an indexed tar later (its checksum written again with it)
    (tmp_path / "tars" / "manifest.parquet").unlink()
    tar(_encode(PHOTO.rotate(90), "PNG"))
    index_shards(tmp_path / "tars", progress=False)
    tar(gif)
    (tmp_path / "tars" / "checksums.json").write_text(json.dumps({"a.tar": sha256_file(tmp_path / "tars" / "a.tar")}))
    counts, problems = verify_dataset(tmp_path / "tars", decode=True, progress=False)
    assert counts["undecodable"] == 1 and len(problems) == 1, problems


def test_an_image_over_pils_bomb_limit_decodes_as_dali_decodes_it(decoders):
    """A 182 MP scan (past the 179 MP at which PIL refuses an image as a possible decompression bomb) is an image to
    DALI: evaluation, search and ``data verify --decode`` must decode it too, and to the same picture."""
    w, h = 13_600, 13_400
    assert w * h > 2 * Image.MAX_IMAGE_PIXELS
    big = np.zeros((h, w), np.uint8)
    big[:, w // 2:] = 255  # dark left half, light right half: what a resize keeps
    data = _encode(Image.fromarray(big), "PNG")
    del big
    assert pil_decodes(data)
    limit = Image.MAX_IMAGE_PIXELS
    with open_image(data) as im:
        assert im.size == (w, h)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own limit, for everyone else, is left as it was
    dali, pil = decoders
    a, b = dali([data])[0][0], pil([data])[0][0]
    assert float(a[:, :, : SIZE // 2 - 1].max()) < 0.01 and float(a[:, :, SIZE // 2 + 1:].min()) > 0.99
    assert float((a - b).abs().mean()) < 0.01


def test_an_image_over_max_pixels_is_undecodable_before_it_is_decoded():
    """A header claiming 40000 x 40000 pixels (1.6 GP) is refused from its header: nothing that size is allocated."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0))
    data = header + chunk(b"IDAT", zlib.compress(b"\x00" * 40_001)) + chunk(b"IEND", b"")
    with pytest.raises(ValueError, match=r"a 40000x40000 image, over the 1,073,741,824 pixels decoded"):
        open_image(data)
    assert not pil_decodes(data)


def test_images_pil_reads_and_dali_does_not_are_skipped_and_found_by_verify(tmp_path):
    """An uncompressed 1-bit TIFF (a scanner's) and a 32-bit integer one: PIL reads them, DALI's decoder does not.
    A batch made of them only was taken for a broken graph (every sample fails alone) and ended the training; it is
    skipped and counted as any undecodable batch, and a good batch still goes through the same augmenter after it.
    `data verify --decode` had passed them (it asked PIL only); it now asks DALI's decoder too."""
    from data_pipeline.dali import CorruptBatch, DaliDecoder
    from data_pipeline.shards import verify_dataset, write_shards

    rng = np.random.default_rng(0)
    scans = [_encode(Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).convert("1"), "TIFF"),
             _encode(Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).convert("I"), "TIFF")]
    photo = _encode(PHOTO, "PNG")
    decoder = DaliDecoder()
    assert all(pil_decodes(s) for s in scans)
    assert [decoder.decodes(s) for s in scans] == [False, False] and decoder.decodes(photo)  # (rebuilt after each)
    aug = AugmentConfig.disabled(mean=[0.0], std=[1.0])
    dali = DaliAugmenter(aug, batch_size=4, image_size=SIZE, channels=3, num_views=1, device="cpu", device_id=None)
    with pytest.raises(CorruptBatch) as bad:
        dali([scans[0], scans[1], scans[0], scans[1]])
    assert bad.value.bad == [0, 1, 2, 3]
    with pytest.raises(CorruptBatch) as bad:
        dali([photo, scans[0], photo, scans[1]])
    assert bad.value.bad == [1, 3]
    assert dali([photo] * 4)[0].shape == (4, 3, SIZE, SIZE)
    (tmp_path / "imgs").mkdir()
    for i, data in enumerate([photo, *scans]):
        (tmp_path / "imgs" / f"{i}.{'png' if i == 0 else 'tif'}").write_bytes(data)
    write_shards(f"images:{tmp_path / 'imgs'}", tmp_path / "ds", progress=False)
    counts, problems = verify_dataset(tmp_path / "ds", decode=True, progress=False)
    assert counts["undecodable"] == 2 and len(problems) == 2, problems
    assert all(p.endswith("the image does not decode") for p in problems)
