"""The whole-pipeline oracles (``dicom_node_lab.world_oracles``): each must change only what it says."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicom_node.pipeline import restore
from dicom_node.pipeline.detect import DetectOptions
from dicom_node_lab import experiment2v2, physics, world, world_oracles


def test_without_beam_hardening_keeps_the_study_but_its_darkening(monkeypatch):
    monkeypatch.setattr(world, "Acquisition", world.Acquisition)  # restored after the test
    i = next(i for i in range(8) if experiment2v2.make_study(6060, i).settings.beam_hardening_hu)
    darkened = experiment2v2.make_study(6060, i)
    world_oracles.without_beam_hardening()
    plain = experiment2v2.make_study(6060, i)
    assert plain.settings.beam_hardening_hu == 0.0 and darkened.settings.noise_sd == plain.settings.noise_sd
    assert np.array_equal(darkened.truth, plain.truth)  # the same anatomy and noise draw
    lighter = plain.image - darkened.image
    near = ndimage.distance_transform_edt(~plain.calcium_mask, sampling=plain.spacing) <= 3.0
    assert lighter[near].sum() > 0 and lighter.max() > 5.0  # the darkening is gone, beside the calcium only
    assert np.abs(lighter[~near]).max() < 1.0
    assert isinstance(world.Acquisition(kernel=physics.Kernel.SOFT, slice_fwhm_mm=0.7, kvp=100, noise_sd=10.0,
                                        beam_hardening_hu=40.0, noise_seed=1), physics.Acquisition)


def test_true_calcium_detects_the_phantoms_own_mask(monkeypatch):
    monkeypatch.setattr(experiment2v2, "make_study", experiment2v2.make_study)
    monkeypatch.setattr(restore, "detect", restore.detect)
    world_oracles.with_given_calcium("true-calcium")
    p = experiment2v2.make_study(6060, 1)
    found = restore.detect(experiment2v2._stored_hu(p.image), p.spacing)
    assert np.array_equal(found.calcium, p.calcium_mask) and len(found.lesions) >= 1
    # the subtraction's level where no contrast is near derives from the threshold: it must be the options' own
    assert found.threshold_hu == DetectOptions().threshold_hu


def test_found_whole_completes_the_deposits_the_detection_reaches_and_no_other():
    true = np.zeros((20, 20, 20), bool)
    true[2:5, 2:12, 5] = True  # a long deposit, detected only at its start
    true[10:13, 15, 2:6] = True  # a deposit the detection misses
    detected = np.zeros_like(true)
    detected[2:5, 2:4, 5:7] = True  # its start, with a voxel of bloom beside it
    detected[17, 17, 17] = True  # a component near no deposit (noise, kept as found)
    whole = world_oracles.found_whole(detected, true)
    assert whole[2:5, 2:12, 5].all() and not whole[2:5, 2:4, 6].any(), "the reached deposit whole, its bloom gone"
    assert not whole[10:13, 15, 2:6].any(), "a deposit the detection missed stays missed"
    assert whole[17, 17, 17] and whole.sum() == 30 + 1


def test_found_union_and_trimmed_are_the_two_halves_of_found_whole():
    true = np.zeros((20, 20, 20), bool)
    true[2:5, 2:12, 5] = True
    true[10:13, 15, 2:6] = True
    detected = np.zeros_like(true)
    detected[2:5, 2:4, 5:7] = True
    detected[17, 17, 17] = True
    union = world_oracles.found_union(detected, true)
    assert union[2:5, 2:12, 5].all() and union[2:5, 2:4, 6].all(), "the reached deposit whole, the bloom kept"
    assert not union[10:13, 15, 2:6].any() and union[17, 17, 17]
    assert union.sum() == 30 + 6 + 1 and not (detected & ~union).any()
    trimmed = world_oracles.found_trimmed(detected, true)
    assert trimmed[2:5, 2:4, 5].all() and not trimmed[2:5, 2:4, 6].any(), "the found part kept, its bloom gone"
    assert not trimmed[2:5, 4:12, 5].any() and trimmed[17, 17, 17] and trimmed.sum() == 6 + 1


def test_an_oracle_that_gives_no_calcium_is_refused_as_a_detection():
    with pytest.raises(ValueError, match="not an oracle that gives the calcium"):
        world_oracles.given_detection("no-beam-hardening", np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4)),
                                      (1.0, 1.0, 1.0))


def test_found_whole_detects_the_engines_calcium_made_whole(monkeypatch):
    monkeypatch.setattr(experiment2v2, "make_study", experiment2v2.make_study)
    monkeypatch.setattr(restore, "detect", restore.detect)
    engine_detect = restore.detect
    world_oracles.with_given_calcium("found-whole")
    for i in range(8):  # a study where the engine's default detection reaches the phantom's calcium
        p = experiment2v2.make_study(6060, i)
        image = experiment2v2._stored_hu(p.image)
        found = engine_detect(image, p.spacing)
        if (found.calcium & p.calcium_mask).any():
            break
    whole = restore.detect(image, p.spacing)
    assert np.array_equal(whole.calcium, world_oracles.found_whole(found.calcium, p.calcium_mask))
    assert (whole.calcium & p.calcium_mask).sum() >= (found.calcium & p.calcium_mask).sum() > 0
    assert whole.threshold_hu == found.threshold_hu


def test_an_unknown_oracle_is_refused(capsys):
    assert world_oracles.main(["perfect-everything", "experiment2v2"]) == 2
    assert "usage" in capsys.readouterr().err
