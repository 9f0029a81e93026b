"""holons.data.read_image: synthetic files of every format (no shared data needed) and the
DICOM conformance collection (shared data): shapes, intensity direction, clean failures, no hangs."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from holons.data import RadiographImage, UnreadableImage, read_image

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
# A guard against a worker that hangs or dies (its result never comes), not a speed check: a read
# that is only slow on a busy machine must not fail the test.
PER_FILE_TIMEOUT_S = 600


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    file_meta: bool = True,
    **tags,
) -> Path:
    """A small DX-like DICOM with ``stored`` (H x W, F x H x W, or H x W x 3 for RGB) as native pixels."""
    ds = Dataset()
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientName = "Secret^Person"
    colour = photometric in ("RGB", "YBR_FULL")
    frames = stored.shape[0] if stored.ndim == 3 and not colour else 1
    ds.Rows, ds.Columns = stored.shape[-3:-1] if colour else stored.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    if file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
    else:  # a bare data set: no preamble, no file meta, implicit VR little endian
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def ramp(shape=(24, 32), lo=0, hi=1000, dtype=np.uint16) -> np.ndarray:
    return np.linspace(lo, hi, int(np.prod(shape))).reshape(shape).round().astype(dtype)


def window_linear(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM LINEAR window formula, written out independently."""
    y = ((x - (center - 0.5)) / (width - 1) + 0.5).astype(np.float64)
    return np.clip(y, 0, 1)


def minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


# ----------------------------------------------------------------------------- synthetic DICOM


def test_monochrome1_reads_as_inverse_of_monochrome2(tmp_path):
    stored = ramp()
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", stored, WindowCenter=500, WindowWidth=800))
    m1 = read_image(
        write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1", WindowCenter=500, WindowWidth=800)
    )
    assert isinstance(m1, RadiographImage)
    assert m1.pixels.dtype == np.float32 and m1.pixels.shape == stored.shape
    np.testing.assert_allclose(m1.pixels, 1 - m2.pixels, atol=1e-6)
    assert m1.meta["inverted"] and not m2.meta["inverted"]
    assert m2.pixels[0, 0] < m2.pixels[-1, -1]  # higher stored value = denser = brighter


def test_presentation_lut_inverse_inverts_monochrome2(tmp_path):
    stored = ramp()
    plain = read_image(write_dicom(tmp_path / "a.dcm", stored))
    inverse = read_image(write_dicom(tmp_path / "b.dcm", stored, PresentationLUTShape="INVERSE"))
    np.testing.assert_allclose(inverse.pixels, 1 - plain.pixels, atol=1e-6)
    assert inverse.meta["inverted"]


def test_rescale_then_window(tmp_path):
    stored = ramp(hi=1000)
    path = write_dicom(
        tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1001
    )
    image = read_image(path)
    expected = window_linear(stored * 2.0 - 1000, center=0, width=1001)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-5)
    assert "window" in image.meta["voi_applied"] and image.meta["voi_fallback"] is None
    assert image.meta["modality_lut"].startswith("rescale slope 2 intercept -1000")


def test_window_linear_exact_and_multivalue(tmp_path):
    stored = ramp(hi=1000)
    path = write_dicom(
        tmp_path / "w.dcm",
        stored,
        WindowCenter=[400, 9999],
        WindowWidth=[200, 1],
        VOILUTFunction="LINEAR_EXACT",
    )
    expected = np.clip((stored - 400.0) / 200 + 0.5, 0, 1)
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-5)


def test_window_missing_the_values_falls_back_to_percentiles(tmp_path):
    stored = ramp(hi=1000)
    missing = read_image(write_dicom(tmp_path / "miss.dcm", stored, WindowCenter=40000, WindowWidth=100))
    absent = read_image(write_dicom(tmp_path / "none.dcm", stored))
    assert missing.meta["voi_fallback"] == "window misses the stored values"
    assert absent.meta["voi_fallback"] == "no window in file"
    assert "percentile" in missing.meta["voi_applied"]
    lo, hi = np.percentile(stored, (0.5, 99.5))
    expected = np.clip((stored - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(missing.pixels, expected, atol=1e-5)
    np.testing.assert_allclose(absent.pixels, expected, atol=1e-5)
    assert missing.pixels.std() > 0.2  # a real image, not a saturated one


def test_voi_policies_percentile_and_minmax_ignore_the_window(tmp_path):
    stored = ramp(hi=1000)
    path = write_dicom(tmp_path / "w.dcm", stored, WindowCenter=100, WindowWidth=50)
    np.testing.assert_allclose(read_image(path, voi="minmax").pixels, minmax(stored), atol=1e-6)
    lo, hi = np.percentile(stored, (0.5, 99.5))
    expected = np.clip((stored - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(read_image(path, voi="percentile").pixels, expected, atol=1e-5)


def test_signed_16_bit(tmp_path):
    stored = ramp(lo=-2000, hi=1500, dtype=np.int16)
    image = read_image(write_dicom(tmp_path / "s.dcm", stored), voi="minmax")
    np.testing.assert_allclose(image.pixels, minmax(stored), atol=1e-6)
    assert image.meta["signed"]


def test_bits_stored_12_masks_the_unused_high_bits(tmp_path):
    values = ramp(hi=4095)
    garbage = (np.arange(values.size).reshape(values.shape) % 16).astype(np.uint16) << 12
    image = read_image(write_dicom(tmp_path / "b12.dcm", values | garbage, bits_stored=12), voi="minmax")
    np.testing.assert_allclose(image.pixels, minmax(values), atol=1e-6)
    assert image.meta["bits_stored"] == 12


def test_signed_12_bit_in_16_is_sign_extended(tmp_path):
    values = ramp(lo=-2048, hi=2047, dtype=np.int16)
    stored = (
        (values.astype(np.int32) & 0x0FFF).astype(np.uint16).view(np.int16)
    )  # two's complement in 12 bits
    image = read_image(write_dicom(tmp_path / "s12.dcm", stored, bits_stored=12), voi="minmax")
    np.testing.assert_allclose(image.pixels, minmax(values), atol=1e-6)


def test_multi_frame_first_chosen_and_all(tmp_path):
    stored = np.stack([ramp(hi=100) + 1000 * k for k in range(3)]).astype(np.uint16)
    path = write_dicom(tmp_path / "mf.dcm", stored)
    first = read_image(path, voi="minmax")
    second = read_image(path, frame=1, voi="minmax")
    every = read_image(path, frame="all", voi="minmax")
    assert first.pixels.shape == stored.shape[1:] and first.meta["frames"] == 3
    np.testing.assert_allclose(first.pixels, minmax(stored[0]), atol=1e-6)
    np.testing.assert_allclose(second.pixels, minmax(stored[1]), atol=1e-6)
    assert every.pixels.shape == stored.shape
    np.testing.assert_allclose(every.pixels, minmax(stored), atol=1e-6)  # one scale for all frames
    assert first.meta["original_shape"] == stored.shape
    with pytest.raises(UnreadableImage, match="frame 3"):
        read_image(path, frame=3)


def test_rgb_dicom_becomes_luminance(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[4:, :, 1] = 255
    image = read_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert image.pixels.shape == (8, 10)
    np.testing.assert_allclose(image.pixels[0, 0], 0.299, atol=1e-3)
    np.testing.assert_allclose(image.pixels[-1, 0], 0.299 + 0.587, atol=1e-3)


def test_dicom_without_preamble_file_meta_or_extension(tmp_path):
    stored = ramp()
    bare = write_dicom(tmp_path / "IM0001", stored, file_meta=False, WindowCenter=500, WindowWidth=800)
    assert bare.read_bytes()[128:132] != b"DICM"
    full = write_dicom(tmp_path / "full.dcm", stored, WindowCenter=500, WindowWidth=800)
    np.testing.assert_allclose(read_image(bare).pixels, read_image(full).pixels)
    assert read_image(bare).meta["transfer_syntax"] == ImplicitVRLittleEndian


def test_dicom_meta_has_spacing_and_no_patient_identifiers(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp(), PixelSpacing=[0.2, 0.25])
    meta = read_image(path).meta
    assert meta["pixel_spacing_mm"] == (0.2, 0.25)
    assert (meta["modality"], meta["body_part"], meta["view_position"]) == ("DX", "CHEST", "PA")
    assert meta["photometric"] == "MONOCHROME2" and meta["format"] == "dicom"
    assert "Secret" not in repr(meta)
    imager = read_image(write_dicom(tmp_path / "b.dcm", ramp(), ImagerPixelSpacing=[0.1, 0.1])).meta
    assert imager["pixel_spacing_mm"] == (0.1, 0.1)
    assert read_image(write_dicom(tmp_path / "c.dcm", ramp())).meta["pixel_spacing_mm"] is None


def test_dicom_without_pixel_data_is_unreadable(tmp_path):
    path = write_dicom(tmp_path / "sr.dcm", ramp())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(UnreadableImage) as info:
        read_image(path)
    assert info.value.reason.startswith("no pixel data")
    assert info.value.path == str(path)


def test_truncated_dicom_is_unreadable(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", ramp((64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(UnreadableImage, match="truncated"):
        read_image(path)
    path.write_bytes(data[:200])  # cut inside the header
    with pytest.raises(UnreadableImage):
        read_image(path)


def test_zero_size_dicom_is_unreadable(tmp_path):
    path = write_dicom(tmp_path / "z.dcm", ramp())
    ds = pydicom.dcmread(path)
    ds.Rows = 0
    ds.save_as(path)
    with pytest.raises(UnreadableImage, match="zero-size"):
        read_image(path)


def test_unreadable_inputs_and_bad_options(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n" * 10)
    empty = tmp_path / "empty.png"
    empty.touch()
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    for path, words in [(text, "not an image"), (empty, "empty"), (tmp_path / "missing.dcm", "not found")]:
        with pytest.raises(UnreadableImage, match=words):
            read_image(path)
    with pytest.raises(UnreadableImage):
        read_image(fake)
    with pytest.raises(UnreadableImage):
        read_image(tmp_path)
    with pytest.raises(ValueError):
        read_image(text, voi="auto")
    with pytest.raises(ValueError):
        read_image(text, frame=-1)


def test_unreadable_image_pickles_with_reason_and_path():
    error = pickle.loads(pickle.dumps(UnreadableImage("no pixel data", "/x/y.dcm")))
    assert (error.reason, error.path) == ("no pixel data", "/x/y.dcm")
    assert "no pixel data" in str(error)


# ----------------------------------------------------------------------------- PNG / JPEG / TIFF / BMP


def test_png_8_bit_gray(tmp_path):
    gray = ramp((20, 30), hi=255, dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    image = read_image(tmp_path / "g.png")
    np.testing.assert_allclose(image.pixels, gray / 255.0, atol=1e-6)
    assert image.meta["format"] == "png" and image.meta["original_shape"] == (20, 30)


def test_png_16_bit_keeps_its_full_range(tmp_path):
    values = ramp((16, 64), hi=65535)
    Image.fromarray(values).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    np.testing.assert_allclose(image.pixels, values / 65535.0, atol=1e-6)
    assert len(np.unique(image.pixels)) > 256  # not squeezed into 8 bits
    assert image.meta["bits_stored"] == 16


def test_png_rgb_rgba_palette_to_gray(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 1] = 200
    rgb[5:, :, 2] = 100
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    expected = (0.587 * 200 + 0.114 * rgb[..., 2]) / 255.0
    for name in ("rgb.png", "rgba.png", "p.png"):
        image = read_image(tmp_path / name)
        assert image.pixels.shape == (10, 12), name
        np.testing.assert_allclose(image.pixels, expected, atol=3e-3, err_msg=name)


def test_jpeg_bmp_and_extensionless_png(tmp_path):
    gray = ramp((32, 32), hi=255, dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(gray).save(tmp_path / "g.bmp")
    Image.fromarray(gray).save(tmp_path / "noext", format="PNG")
    assert read_image(tmp_path / "g.jpg").meta["format"] == "jpeg"
    np.testing.assert_allclose(read_image(tmp_path / "g.jpg").pixels, gray / 255.0, atol=0.03)
    np.testing.assert_allclose(read_image(tmp_path / "g.bmp").pixels, gray / 255.0, atol=1e-6)
    np.testing.assert_allclose(read_image(tmp_path / "noext").pixels, gray / 255.0, atol=1e-6)


def test_tiff_16_bit_float_and_pages(tmp_path):
    import tifffile

    values = ramp((8, 40), hi=65535)
    Image.fromarray(values).save(tmp_path / "g16.tif")
    np.testing.assert_allclose(read_image(tmp_path / "g16.tif").pixels, values / 65535.0, atol=1e-6)
    pages = [Image.fromarray(ramp((6, 7), hi=255, dtype=np.uint8) // (k + 1)) for k in range(3)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    np.testing.assert_allclose(
        read_image(tmp_path / "pages.tif", frame=2).pixels, np.asarray(pages[2]) / 255.0
    )
    assert read_image(tmp_path / "pages.tif", frame="all").pixels.shape == (3, 6, 7)
    rgb16 = np.zeros((5, 6, 3), np.uint16)
    rgb16[..., 0] = 65535
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16, photometric="rgb")  # Pillow cannot: tifffile fallback
    np.testing.assert_allclose(read_image(tmp_path / "rgb16.tif").pixels, 0.299, atol=1e-4)
    floats = np.linspace(-1, 3, 30, dtype=np.float32).reshape(5, 6)
    tifffile.imwrite(tmp_path / "f.tif", floats)
    image = read_image(tmp_path / "f.tif", voi="minmax")
    np.testing.assert_allclose(image.pixels, minmax(floats), atol=1e-6)
    assert read_image(tmp_path / "f.tif").meta["voi_fallback"] == "no window in file"


@pytest.mark.parametrize("suffix", ["png", "jpg", "tif", "nii", "nii.gz", "mha", "nrrd"])
def test_truncated_files_of_every_format_are_unreadable(tmp_path, suffix):
    gray = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    path = tmp_path / f"full.{suffix}"
    if suffix.startswith("nii"):
        nib.save(nib.Nifti1Image(np.repeat(gray[..., None], 3, axis=2), np.eye(4)), path)
    elif suffix in ("mha", "nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(gray), str(path))
    else:
        Image.fromarray(gray).save(path)
    data = path.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImage) as info:
        read_image(cut)
    if suffix not in ("mha", "nrrd"):  # ITK's messages do not say "truncated"
        assert info.value.reason.startswith("truncated"), info.value.reason


def test_meta_has_the_same_keys_for_every_format(tmp_path):
    gray = ramp((8, 8), hi=255, dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "a.png")
    nib.save(nib.Nifti1Image(gray, np.eye(4)), tmp_path / "a.nii")
    sitk.WriteImage(sitk.GetImageFromArray(gray), str(tmp_path / "a.mha"))
    write_dicom(tmp_path / "a.dcm", gray)
    keys = [list(read_image(tmp_path / name).meta) for name in ("a.png", "a.nii", "a.mha", "a.dcm")]
    assert all(k == keys[0] for k in keys)
    assert read_image(tmp_path / "a.png").meta["modality"] is None


# ----------------------------------------------------------------------------- NIfTI, MHA, NRRD


def volume(shape=(6, 5, 4)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_nifti_slices_and_projections(tmp_path):
    data = volume()
    img = nib.Nifti1Image(data, np.diag([0.5, 0.7, 2.0, 1.0]))
    nib.save(img, tmp_path / "v.nii.gz")
    path = tmp_path / "v.nii.gz"
    middle = read_image(path, voi="minmax")
    np.testing.assert_allclose(middle.pixels, minmax(data[:, :, 2].T), atol=1e-6)  # rows = j, columns = i
    assert middle.meta["nifti_slice"] == 2 and middle.meta["pixel_spacing_mm"] == pytest.approx((0.7, 0.5))
    np.testing.assert_allclose(read_image(path, nifti_slice=0, voi="minmax").pixels, minmax(data[:, :, 0].T))
    np.testing.assert_allclose(
        read_image(path, nifti_axis=0, nifti_slice=1, voi="minmax").pixels, minmax(data[1].T), atol=1e-6
    )
    np.testing.assert_allclose(
        read_image(path, nifti_projection="max", voi="minmax").pixels, minmax(data.max(axis=2).T), atol=1e-6
    )
    np.testing.assert_allclose(
        read_image(path, nifti_projection="mean", voi="minmax").pixels, minmax(data.mean(axis=2).T), atol=1e-6
    )
    with pytest.raises(UnreadableImage, match="slice 9"):
        read_image(path, nifti_slice=9)


def test_nifti_2d_4d_and_display_range(tmp_path):
    flat = volume((6, 5))
    nib.save(nib.Nifti1Image(flat, np.eye(4)), tmp_path / "flat.nii")
    np.testing.assert_allclose(read_image(tmp_path / "flat.nii", voi="minmax").pixels, minmax(flat.T))
    four = np.stack([volume(), -volume()], axis=-1)
    nib.save(nib.Nifti1Image(four, np.eye(4)), tmp_path / "four.nii.gz")
    np.testing.assert_allclose(
        read_image(tmp_path / "four.nii.gz", voi="minmax").pixels, minmax(four[:, :, 2, 0].T), atol=1e-6
    )
    calibrated = nib.Nifti1Image(flat, np.eye(4))
    calibrated.header["cal_min"], calibrated.header["cal_max"] = 0, 10
    nib.save(calibrated, tmp_path / "cal.nii")
    image = read_image(tmp_path / "cal.nii")
    np.testing.assert_allclose(image.pixels, np.clip(flat.T / 10, 0, 1), atol=1e-6)
    assert image.meta["voi_fallback"] is None


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_2d_and_3d(tmp_path, suffix):
    gray = ramp((12, 20), hi=255, dtype=np.uint8)
    img = sitk.GetImageFromArray(gray)
    img.SetSpacing((0.3, 0.4))  # (x = column, y = row)
    sitk.WriteImage(img, str(tmp_path / f"g{suffix}"))
    image = read_image(tmp_path / f"g{suffix}")
    np.testing.assert_allclose(image.pixels, gray / 255.0, atol=1e-6)
    assert image.meta["pixel_spacing_mm"] == pytest.approx((0.4, 0.3))
    assert image.meta["format"] == suffix[1:]
    data = volume()
    sitk.WriteImage(sitk.GetImageFromArray(data.transpose()), str(tmp_path / f"v{suffix}"))  # voxel (i, j, k)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii")
    for options in ({}, {"nifti_axis": 1, "nifti_slice": 3}, {"nifti_projection": "max"}):
        itk = read_image(tmp_path / f"v{suffix}", voi="minmax", **options).pixels
        np.testing.assert_allclose(itk, read_image(tmp_path / "v.nii", voi="minmax", **options).pixels)


def test_itk_rgb_becomes_gray(tmp_path):
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 2] = 255
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.mha"))
    image = read_image(tmp_path / "rgb.mha", voi="minmax")
    assert image.pixels.shape == (4, 5) and image.meta["photometric"] == "RGB"


# ------------------------------------------------------------------ DICOM conformance (shared data)


def _listed_shape(row) -> tuple[tuple[int, ...], tuple[int, int]]:
    """``decoded_shape`` of the index (F x H x W x S as pydicom decodes) and its H x W."""
    dims = tuple(int(n) for n in str(row.decoded_shape).split("x"))
    samples = int(row.samples_per_pixel) if str(row.samples_per_pixel) not in ("", "nan") else 1
    spatial = dims[:-1] if samples > 1 else dims
    return dims, tuple(spatial[-2:])


def _stored_gray(path: Path) -> np.ndarray:
    """Frame 0 as pydicom decodes it (palette and colour as luminance), for the direction check."""
    ds = pydicom.dcmread(path, force=True)
    array = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        array = array[0]
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
    if array.ndim == 3:
        array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return array.astype(np.float64)


def _read_all(paths: list[Path], **options) -> dict[Path, object]:
    """Read every path in spawned worker processes; a crash or hang shows up as a TimeoutError result."""
    results: dict[Path, object] = {}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pending = {path: pool.apply_async(read_image, (path,), options) for path in paths}
        for path, result in pending.items():
            try:
                results[path] = result.get(timeout=PER_FILE_TIMEOUT_S)
            except Exception as error:  # UnreadableImage, or what must not happen (crash, hang)
                results[path] = error
        pool.terminate()
    return results


@pytest.fixture(scope="module")
def conformance(shared_data):
    import pandas as pd

    root = shared_data / "dicom" / "conformance"
    index = pd.read_csv(root / "dicom_index.csv", dtype=str, keep_default_na=False)
    paths = [root / name for name in index.file]
    multi = [
        root / r.file
        for r in index.itertuples()
        if r.pydicom_decode == "ok"
        and "x" in r.decoded_shape
        and r.frames not in ("", "1")
        and int(float(r.frames)) > 1
    ]
    first = _read_all(paths)
    every = _read_all(multi, frame="all")
    return root, index, first, every


def test_conformance_nothing_crashes_or_hangs(conformance):
    _, index, first, every = conformance
    bad = {
        str(p): repr(r)[:200]
        for p, r in {**first, **every}.items()
        if not isinstance(r, (RadiographImage, UnreadableImage))
    }
    assert not bad, bad
    assert len(first) == len(index) == 305
    for result in first.values():
        if isinstance(result, UnreadableImage):
            assert result.reason.strip()


def test_conformance_ok_files_read_with_listed_shape(conformance):
    root, index, first, every = conformance
    ok = index[index.pydicom_decode == "ok"]
    assert len(ok) > 150
    wrong = {}
    for row in ok.itertuples():
        result = first[root / row.file]
        dims, height_width = _listed_shape(row)
        if not isinstance(result, RadiographImage):
            wrong[row.file] = str(result)
            continue
        pixels = result.pixels
        if pixels.shape != height_width or result.meta["original_shape"] != dims:
            wrong[row.file] = (pixels.shape, result.meta["original_shape"], row.decoded_shape)
        elif pixels.dtype != np.float32 or not (
            np.isfinite(pixels).all() and 0 <= pixels.min() <= pixels.max() <= 1
        ):
            wrong[row.file] = "pixels not float32 in [0, 1]"
    for path, result in every.items():
        row = index[index.file == str(path.relative_to(root))].iloc[0]
        dims, height_width = _listed_shape(row)
        if not isinstance(result, RadiographImage) and "broadcast" not in str(result):
            wrong[row.file + " (all frames)"] = str(result)
        elif isinstance(result, RadiographImage) and result.pixels.shape != (dims[0], *height_width):
            wrong[row.file + " (all frames)"] = (result.pixels.shape, row.decoded_shape)
    assert not wrong, wrong


def test_conformance_intensity_direction(conformance):
    """Output correlates positively with the stored values, negatively for MONOCHROME1 / INVERSE."""
    root, index, first, _ = conformance
    checked, inverted, wrong = 0, 0, {}
    for row in index[index.pydicom_decode == "ok"].itertuples():
        result = first[root / row.file]
        stored = _stored_gray(root / row.file)
        pixels = result.pixels.astype(np.float64)
        if stored.std() == 0 or pixels.std() == 0:
            continue
        correlation = np.corrcoef(stored.ravel(), pixels.ravel())[0, 1]
        expect_inverted = (
            result.meta["photometric"] == "MONOCHROME1" or "PresentationLUTShape=INVERSE" in row.features
        )
        assert result.meta["inverted"] == expect_inverted, row.file
        if (correlation < 0) != expect_inverted:
            wrong[row.file] = correlation
        checked += 1
        inverted += expect_inverted
    assert not wrong, wrong
    assert checked > 150 and inverted >= 3


def test_conformance_non_ok_files_fail_cleanly(conformance):
    root, index, first, _ = conformance
    failing = index[index.pydicom_decode != "ok"]
    reasons = {row.file: first[root / row.file] for row in failing.itertuples()}
    assert all(isinstance(r, (RadiographImage, UnreadableImage)) for r in reasons.values())
    no_pixels = [
        r for name, r in reasons.items() if index.set_index("file").loc[name, "has_pixel_data"] == "False"
    ]
    assert no_pixels and all(isinstance(r, UnreadableImage) for r in no_pixels)
    dicomdir = reasons["pydicom/dicomdirtests/DICOMDIR"]
    assert isinstance(dicomdir, UnreadableImage) and "DICOMDIR" in dicomdir.reason


def test_fake_monochrome1_is_inverse_of_its_monochrome2_twin(shared_data):
    folder = shared_data / "radiographs" / "txv_samples" / "dicom"
    fake = read_image(folder / "Fake_MONOHR1.dcm")
    twin = next(p for p in folder.glob("*.dcm") if p.name != "Fake_MONOHR1.dcm")
    original = read_image(twin)
    assert fake.meta["photometric"] == "MONOCHROME1" and original.meta["photometric"] == "MONOCHROME2"
    assert fake.pixels.shape == original.pixels.shape == (1024, 1024)
    correlation = np.corrcoef(fake.pixels.ravel(), original.pixels.ravel())[0, 1]
    assert correlation < -0.95
