"""CBIS-DDSM from the TCIA DICOM download (NBIA descriptive layout), with tiny DICOM files
written by pydicom, and DICOM decoding in the one image pipeline."""

from __future__ import annotations

import shutil

import pytest

from medift.datasets import cbis_ddsm
from medift.images import ImageLoadError, is_dicom, load_image
from tests.fixtures.cbis_dicom import (
    _case_dir,
    _crop_pixels,
    _mask_pixels,
    real_cbis_dicom_layout,
    write_dicom,
)
from tests.fixtures.data import (
    assert_patients_disjoint,
    real_cbis_layout,
    real_data_missing,
)

# --- decoding ------------------------------------------------------------------------------------


def test_dicom_is_decoded_stretched_and_monochrome1_inverted(tmp_path):
    pixels = _crop_pixels()
    plain = write_dicom(tmp_path / "a.dcm", pixels, "cropped images", "1.2.3")
    image = load_image(plain)
    assert image.size == (10, 12) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((9, 11)) == (255, 255, 255)
    inverted = load_image(write_dicom(tmp_path / "b.dcm", pixels, "cropped images", "1.2.3", "MONOCHROME1"))
    assert inverted.getpixel((0, 0)) == (255, 255, 255) and inverted.getpixel((9, 11)) == (0, 0, 0)
    renamed = tmp_path / "no_suffix"
    shutil.copy(plain, renamed)
    assert is_dicom(renamed) and load_image(renamed).size == (10, 12)


def test_truncated_or_non_dicom_file_names_the_file(tmp_path):
    path = write_dicom(tmp_path / "cut.dcm", _crop_pixels(), "cropped images", "1.2.3")
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ImageLoadError, match="cut.dcm"):
        load_image(path)
    (tmp_path / "text.dcm").write_text("not a dicom")
    with pytest.raises(ImageLoadError, match="text.dcm"):
        load_image(tmp_path / "text.dcm")


# --- finding the crop -----------------------------------------------------------------------------


def test_crop_by_folder_name_then_by_header_then_by_size(tmp_path):
    # 1. The descriptive layout: one DICOM in a "cropped images" series folder.
    case = _case_dir(tmp_path, "Mass-Training_P_00001_LEFT_CC_1")
    write_dicom(case / "1.000000-ROI mask images-80621" / "1-1.dcm", _mask_pixels(), "ROI mask images", "9.1")
    crop = write_dicom(case / "1.000000-cropped images-34483" / "1-1.dcm", _crop_pixels(), "cropped images", "9.2")
    finder = cbis_ddsm.crop_finder(tmp_path)  # no csv/dicom_info.csv: the DICOM layout
    assert isinstance(finder, cbis_ddsm.DicomCrops)
    assert finder.find("Mass-Training_P_00001_LEFT_CC_1", "9.2") == (str(crop.resolve()), "")
    # 2. Folders not descriptive (UIDs): the SeriesDescription header decides.
    case = _case_dir(tmp_path, "Calc-Training_P_00005_RIGHT_CC_1")
    write_dicom(case / "9.3" / "000000.dcm", _mask_pixels(), "ROI mask images", "9.3")
    crop = write_dicom(case / "9.4" / "000001.dcm", _crop_pixels(), "cropped images", "9.4")
    assert finder.find("Calc-Training_P_00005_RIGHT_CC_1", "9.4")[0] == str(crop.resolve())
    # 3. Crop and mask sharing one series (older downloads): the smaller image is the crop,
    #    whatever the file names say.
    case = _case_dir(tmp_path, "Mass-Test_P_00016_LEFT_CC_1")
    write_dicom(case / "1.000000-ROI mask images-11111" / "1-1.dcm", _mask_pixels(), "ROI mask images", "9.5")
    crop = write_dicom(case / "1.000000-ROI mask images-11111" / "1-2.dcm", _crop_pixels(), "ROI mask images", "9.5")
    assert finder.find("Mass-Test_P_00016_LEFT_CC_1", "9.5")[0] == str(crop.resolve())
    # Ambiguous or absent: quarantined with a reason.
    case = _case_dir(tmp_path, "Mass-Test_P_00017_LEFT_CC_1")
    for name in ("1-1.dcm", "1-2.dcm"):
        write_dicom(case / "1.000000-ROI mask images-22222" / name, _mask_pixels(), "ROI mask images", "9.6")
    assert finder.find("Mass-Test_P_00017_LEFT_CC_1", "9.6") == (
        None,
        "no single cropped image in the case's DICOM folder",
    )
    assert finder.find("Mass-Test_P_00099_LEFT_CC_1", "9.7") == (None, "no DICOM folder for the case")


# --- the real case descriptions in the NBIA layout ----------------------------------------------------


@pytest.mark.skipif(bool(real_data_missing("cbis-ddsm")), reason=real_data_missing("cbis-ddsm"))
def test_real_case_descriptions_with_dicom_images_match_the_jpeg_release(tmp_path):
    dicom = cbis_ddsm.read_records(real_cbis_dicom_layout(tmp_path / "dicom"), seed=0)
    assert dicom.rows_read == 1318 + 1546 and not dicom.quarantined
    assert all("cropped images" in r.image_path and r.image_path.endswith("1-1.dcm") for r in dicom.records)
    assert_patients_disjoint(dicom.records)
    real_cbis_layout(tmp_path / "jpeg")
    jpeg = cbis_ddsm.read_records(tmp_path / "jpeg", seed=0)

    def summary(result):
        return sorted((r.image_id, r.patient_id, r.split, tuple(sorted(r.attributes.items()))) for r in result.records)

    assert summary(dicom) == summary(jpeg)
    assert load_image(dicom.records[0].image_path).size == (10, 12)
