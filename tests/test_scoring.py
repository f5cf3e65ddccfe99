"""Identity and prompt-fidelity scores on real photos: SFace (independent), the stand-in recognizer, the glintr100
scorer on stand-ins of insightface's two packs, tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from faceid.errors import FaceIDError, MissingWeightsError, NoFaceError
from faceid.faces import FaceAnalyzer
from faceid.scoring import (
    SFACE_COSINE_THRESHOLD,
    ClipTextScorer,
    IdentityScore,
    IdentityScorer,
    PeopleScore,
    SFaceAnalyzer,
    detection_rate,
    diversity,
    glintr100_scorer,
    pack_scorer,
    sface_scorer,
)


@pytest.fixture(scope="module")
def sface():
    return sface_scorer()


@pytest.fixture(scope="module")
def standin(face_models_dir):
    return IdentityScorer(FaceAnalyzer.from_dir(face_models_dir))


def _blank(size=(320, 240)):
    return Image.new("RGB", size, (120, 160, 200))


# ---------------------------------------------------------------------- identity
def test_sface_tells_people_apart_on_real_photos(sface, faces_dir):
    obama, obama2, biden = (faces_dir / f"{n}.jpg" for n in ("obama", "obama2", "biden"))
    same = sface.score(obama2, obama)
    other = sface.score(biden, obama)
    other2 = sface.score(biden, obama2)
    print(
        f"\nSFace cosine: obama vs obama2 {same.similarity:.3f}; obama vs biden {other.similarity:.3f}; "
        f"obama2 vs biden {other2.similarity:.3f} (OpenCV Zoo same-person threshold {SFACE_COSINE_THRESHOLD})"
    )
    assert same.recognizer == other.recognizer == "sface"
    assert not (same.no_face or other.no_face or other2.no_face)
    # Same person well above the published threshold, different people well below it.
    assert same.similarity > SFACE_COSINE_THRESHOLD + 0.2
    assert max(other.similarity, other2.similarity) < SFACE_COSINE_THRESHOLD
    assert same.similarity - max(other.similarity, other2.similarity) > 0.3
    # Symmetric up to the (deterministic) choice of face in each photo.
    assert sface.score(obama, obama2).similarity == pytest.approx(same.similarity, abs=1e-5)


@pytest.mark.parametrize("which", ["standin", "sface"])
def test_an_image_against_itself_scores_one(which, request, faces_dir):
    scorer = request.getfixturevalue(which)
    for name in ("obama", "biden"):
        photo = faces_dir / f"{name}.jpg"
        result = scorer.score(photo, photo)
        assert isinstance(result, IdentityScore) and not result.no_face
        assert result.similarity == pytest.approx(1.0, abs=1e-5)
        assert result.recognizer == scorer.name
    # A PIL image and an array of the same photo are the same image.
    pil = Image.open(faces_dir / "obama.jpg")
    assert scorer.score(np.asarray(pil.convert("RGB")), pil).similarity == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("which", ["standin", "sface"])
def test_no_face_scores_zero_with_the_flag(which, request, faces_dir):
    scorer = request.getfixturevalue(which)
    result = scorer.score(_blank(), faces_dir / "obama.jpg")
    assert result == IdentityScore(0.0, True, scorer.name)
    assert detection_rate([result, scorer.score(faces_dir / "obama2.jpg", faces_dir / "obama.jpg")]) == 0.5
    with pytest.raises(NoFaceError, match="reference"):
        scorer.score(faces_dir / "obama.jpg", _blank())


def test_the_largest_face_is_the_one_scored(sface, faces_dir):
    """A group picture: Obama large, Biden small. Against Obama it is Obama; against Biden, still Obama."""
    big = Image.open(faces_dir / "obama2.jpg").convert("RGB")
    small = Image.open(faces_dir / "biden.jpg").convert("RGB")
    big = big.resize((big.width * 700 // big.height, 700))
    small = small.resize((small.width * 350 // small.height, 350))
    group = Image.new("RGB", (big.width + small.width + 40, 700), "white")
    group.paste(big, (0, 0))
    group.paste(small, (big.width + 40, 175))
    assert len(sface.analyzer.analyze(group)) == 2
    as_obama = sface.score(group, faces_dir / "obama.jpg").similarity
    as_biden = sface.score(group, faces_dir / "biden.jpg").similarity
    print(f"\ngroup picture vs obama {as_obama:.3f}, vs biden {as_biden:.3f}")
    assert as_obama > SFACE_COSINE_THRESHOLD > as_biden


def _side_by_side(*photos):
    """A real picture of several people: the photos pasted left to right, with the x where each one starts."""
    images = [Image.open(photo).convert("RGB") for photo in photos]
    pair = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    starts = np.cumsum([0] + [im.width for im in images])
    for image, x in zip(images, starts, strict=False):
        pair.paste(image, (int(x), 0))
    return pair, starts


def test_each_person_gets_their_own_face_in_a_two_person_photo(sface, faces_dir):
    """Obama and Biden side by side, scored against another photo of Obama and Biden's: each reference gets
    its own face, in either order of the references; every face is used once."""
    pair, starts = _side_by_side(faces_dir / "obama.jpg", faces_dir / "biden.jpg")
    obama, biden = faces_dir / "obama2.jpg", faces_dir / "biden.jpg"
    assert len(sface.analyzer.analyze(pair)) == 2
    for references, order in (([obama, biden], ("obama", "biden")), ([biden, obama], ("biden", "obama"))):
        result = sface.score_people(pair, references)
        assert isinstance(result, PeopleScore) and result.extra_faces == 0 and result.recognizer == "sface"
        for person, score in zip(order, result.people, strict=True):
            centre = (score.box[0] + score.box[2]) / 2
            assert not score.no_face and (centre < starts[1]) == (person == "obama"), (person, score)
            assert score.similarity > SFACE_COSINE_THRESHOLD  # the same person in both photos
        assert result.people[order.index("biden")].similarity > 0.9  # Biden's reference is the pasted photo
    print(f"\ntwo-person photo vs [obama2, biden]: {sface.score_people(pair, [obama, biden])}")


def test_a_missing_person_is_not_found_and_extra_faces_are_counted(sface, faces_dir):
    obama, biden = faces_dir / "obama2.jpg", faces_dir / "biden.jpg"
    only_obama = sface.score_people(faces_dir / "obama.jpg", [biden, obama])  # Biden is not in the picture
    assert only_obama.people[0] == IdentityScore(0.0, True, "sface") and only_obama.extra_faces == 0
    assert not only_obama.people[1].no_face and only_obama.people[1].similarity > SFACE_COSINE_THRESHOLD
    pair, starts = _side_by_side(faces_dir / "obama.jpg", faces_dir / "biden.jpg")
    one_person = sface.score_people(pair, [biden])  # Biden's face, and Obama's left over
    assert one_person.extra_faces == 1 and one_person.people[0].box[0] >= starts[1] - 1
    nobody = sface.score_people(_blank(), [obama, biden])
    assert nobody == PeopleScore((IdentityScore(0.0, True, "sface"),) * 2, 0, "sface")
    with pytest.raises(FaceIDError, match="list of references"):
        sface.score_people(pair, obama)


class _FixedFaces:
    """An analyzer that finds the same faces in every image, with the embeddings given (one per face)."""

    name = "fixed"

    def __init__(self, embeddings):
        self.faces = [
            type("Face", (), {"box": np.array([10.0 * k, 0, 10.0 * k + 8, 8]), "embedding": e})()
            for k, e in enumerate(embeddings)
        ]

    def analyze(self, image):
        return self.faces


def test_the_assignment_maximises_the_total_similarity():
    """Person A is a little closer to face 0 than to face 1, person B resembles face 0 only: the best
    assignment gives face 1 to A and face 0 to B (total 0.8 + 0.4), where A taking its own best face
    first would leave B with a stranger (0.9 + 0.1)."""
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])

    def face(sim_a, sim_b):  # a unit vector with these cosines to a and b
        return np.array([sim_a, sim_b, np.sqrt(1.0 - sim_a**2 - sim_b**2)])

    scorer = IdentityScorer(_FixedFaces([face(0.9, 0.4), face(0.8, 0.1)]))
    result = scorer.score_people("any image", [a, b])
    assert [round(p.similarity, 6) for p in result.people] == [0.8, 0.4]
    assert [p.box[0] for p in result.people] == [10.0, 0.0]
    # The one-person score is the largest face's (all boxes are the same size here: the first one).
    assert scorer.score("any image", a) == IdentityScore(pytest.approx(0.9), False, "fixed", (0.0, 0.0, 8.0, 8.0))


def test_reference_may_be_an_embedding_of_the_same_recognizer(sface, standin, faces_dir):
    ref = sface.reference_embedding(faces_dir / "obama.jpg")
    assert ref.shape == (128,) and np.linalg.norm(ref) == pytest.approx(1.0, abs=1e-5)
    by_photo = sface.score(faces_dir / "obama2.jpg", faces_dir / "obama.jpg").similarity
    assert sface.score(faces_dir / "obama2.jpg", ref * 3.0).similarity == pytest.approx(by_photo, abs=1e-6)
    assert [s.similarity for s in sface.score_many([faces_dir / "obama2.jpg", _blank()], ref)] == [
        pytest.approx(by_photo, abs=1e-6),
        0.0,
    ]
    with pytest.raises(FaceIDError, match="128-d"):  # a 128-d SFace vector is no ArcFace reference
        standin.score(faces_dir / "obama2.jpg", ref)


def test_sface_uses_its_own_pipeline(sface, standin, faces_dir):
    """Independent at every stage: YuNet + OpenCV alignCrop + a 128-d SFace embedding."""
    analyzer = sface.analyzer
    assert isinstance(analyzer, SFaceAnalyzer) and analyzer._aligner is not None
    face = analyzer.analyze(faces_dir / "obama.jpg")[0]
    assert face.aligned.shape == (112, 112, 3) and face.aligned.dtype == np.uint8
    assert face.embedding.shape == (128,) and np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    assert standin.name == "standin_recognizer" and sface.name == "sface"


def test_the_glintr100_scorer_embeds_with_antelopev2s_recognizer(tmp_path, faces_dir):
    """``glintr100``: InstantID's training recognizer, antelopev2's (here stand-ins of both packs, which give
    different vectors): its scores are the cosines of antelopev2's embeddings, not buffalo_l's."""
    from face_helpers import make_test_face_models_dir

    from faceid.evaluation.methods import scorer_recognizer

    both = make_test_face_models_dir(tmp_path / "both", pack="buffalo_l")
    make_test_face_models_dir(both, pack="antelopev2")
    obama, obama2 = faces_dir / "obama.jpg", faces_dir / "obama2.jpg"

    def cosine(analyzer, pack):
        a, b = (analyzer.get(photo).embedding_for(pack) for photo in (obama, obama2))
        return float(np.dot(a, b))

    glint = glintr100_scorer(both)
    assert glint.name == "glintr100" and scorer_recognizer(glint) == "glintr100"
    assert glint.analyzer.pack == "antelopev2" and not glint.analyzer.extra_recognizers  # runs that one alone
    expected = cosine(FaceAnalyzer.from_pretrained(both, "antelopev2"), "antelopev2")
    arcface = cosine(FaceAnalyzer.from_dir(both), "buffalo_l")
    assert abs(expected - arcface) > 1e-3  # the two stand-ins disagree, so the check below tells them apart
    assert glint.score(obama2, obama).similarity == pytest.approx(expected, abs=1e-5)

    # Beside buffalo_l's analyzer: its detector is shared, and antelopev2's recognizer when it already runs it.
    buffalo = FaceAnalyzer.from_dir(both)
    beside = glintr100_scorer(both, analyzer=buffalo)
    assert beside.analyzer.detector is buffalo.detector and beside.analyzer.recognizer is not buffalo.recognizer
    assert beside.score(obama2, obama).similarity == pytest.approx(expected, abs=1e-5)
    with_pack = buffalo.with_pack("antelopev2", both)
    shared = pack_scorer("antelopev2", analyzer=with_pack, download=False)
    assert shared.analyzer.recognizer is with_pack.extra_recognizers["antelopev2"]
    assert shared.score(obama2, obama).similarity == pytest.approx(expected, abs=1e-5)
    assert pack_scorer("buffalo_l", both).name == "arcface"

    # A folder without antelopev2's recognizer is refused, naming the pack.
    only_buffalo = make_test_face_models_dir(tmp_path / "buffalo", pack="buffalo_l")
    with pytest.raises(MissingWeightsError, match="antelopev2"):
        glintr100_scorer(only_buffalo)
    with pytest.raises(FaceIDError, match="no scorer for face pack 'sface'"):
        pack_scorer("sface")


# ---------------------------------------------------------------------- CLIP-T
def test_clip_t_is_the_cosine_of_clip_embeddings(tiny_clip_dir, faces_dir):
    from transformers import CLIPModel, CLIPTokenizer

    scorer = ClipTextScorer(tiny_clip_dir, device="cpu", batch_size=2)
    images = [Image.open(faces_dir / f"{n}.jpg") for n in ("obama", "obama2", "biden")] + [_blank(), _blank((24, 16))]
    prompts = ["a photo of a person", "an oil painting of a man", "a person at the beach", "blue sky", "a red car"]
    scores = scorer.score(images, prompts)
    assert scores.shape == (5,) and scores.dtype == np.float32
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)

    # transformers' own forward pass: logits_per_image = exp(logit_scale) * cosine.
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokens = CLIPTokenizer.from_pretrained(tiny_clip_dir)(prompts, padding=True, return_tensors="pt")
    pixels = scorer.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        cosine = (out.logits_per_image / model.logit_scale.exp()).diagonal().numpy()
    np.testing.assert_allclose(scores, cosine, atol=1e-5)

    # Batching does not change anything; one prompt serves all images; embeddings are unit vectors.
    singles = [scorer.score_one(im, p) for im, p in zip(images, prompts, strict=True)]
    np.testing.assert_allclose(scores, singles, atol=1e-5)
    np.testing.assert_allclose(scorer.score(images[:2], "a red car"), scorer.score(images[:2], ["a red car"] * 2))
    np.testing.assert_allclose(np.linalg.norm(scorer.text_embeddings(prompts), axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images, prompts[:2])


def test_diversity_is_the_mean_pairwise_cosine_distance():
    assert diversity(np.ones((3, 4))) == pytest.approx(0.0, abs=1e-6)
    assert diversity(np.eye(3)) == pytest.approx(1.0)
    assert diversity(np.array([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(2.0)
    assert diversity(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])) == pytest.approx(
        np.mean([1 - np.sqrt(0.5), 1.0, 1 - np.sqrt(0.5)])
    )
    assert diversity(np.ones((1, 4))) is None
    assert detection_rate([]) is None
