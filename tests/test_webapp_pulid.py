"""PuLID and PuLID-FLUX in the web app at ``/``, in a real browser (Debian's chromium through Selenium, as
``test_webapp``): a real uvicorn server on the tests' tiny SDXL with a tiny PuLID v1.1 (``tiny_models.build_pulid``),
and one on the tiny FLUX with a tiny InfiniteYou and a tiny PuLID-FLUX (``build_infiniteyou``,
``build_pulid_flux``), stand-in face models of both insightface packs.

Checked: on the SDXL set, the method menu lists PuLID beside FaceID, with its licence line (not for commercial use:
the antelopev2 face models) and its default identity strength (0.8), and no other method's field; a generation
through the page with PuLID records its method and equals, pixel for pixel, the same request sent to the API. On the
FLUX set, PuLID-FLUX's true CFG field is shown only while PuLID-FLUX is chosen (placeholder: 1, off), the negative
prompt only while true CFG is above 1; a comparison of PuLID-FLUX (true CFG 2, a negative prompt) with InfiniteYou
sends both to PuLID-FLUX's job only (read back from ``GET /v1/generations/{id}``), and the gallery names them.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from conftest import load_tiny_sdxl
from PIL import Image
from test_flux_controlnets import make_flux_controlnet
from test_serve import wait_finished
from test_webapp import WAIT, browser, loaded_images, make_server, screenshot, set_value  # noqa: F401 (fixtures)

from faceid.faces import FaceAnalyzer
from faceid.pipeline import FaceIDPipeline

PROMPT = "a photo of a person in a garden"


@pytest.fixture(scope="module")
def analyzer(both_packs):
    """The server's face analysis as ``faceid serve`` loads it: buffalo_l's (the service adds the methods' pack)."""
    return FaceAnalyzer.from_dir(both_packs)


@pytest.fixture(scope="module")
def pipe(tiny_models, both_packs):
    """The tiny SDXL (``make_server``'s default pipeline here, in place of the SD1.5 one this module does not use);
    the server's worker loads PuLID onto it (``Worker.equip``)."""
    return load_tiny_sdxl(tiny_models, both_packs)


@pytest.fixture(scope="module")
def flux_folders(flux_dir, infiniteyou_dir, pulid_flux_dir):
    """The tiny FLUX, a tiny InfiniteYou with facexlib's recognizer file beside it, a tiny PuLID-FLUX."""
    return flux_dir, {"infiniteyou": str(infiniteyou_dir), "pulid-flux": str(pulid_flux_dir)}


def png(client, url) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(BytesIO(response.content)).convert("RGB"))


def enroll_on_page(driver, wait, faces_dir) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    driver.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)


def shown(driver, element_id: str) -> bool:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).is_displayed()


def finished(driver, element_id: str) -> bool:
    """Whether the status line ``element_id`` says done or an error."""
    from selenium.webdriver.common.by import By

    status = driver.find_element(By.ID, element_id)
    return status.text.startswith("done") or "error" in status.get_attribute("class").split()


def test_web_app_pulid_menu_and_a_generation_equal_to_the_api(make_server, browser, pipe, pulid_dir, both_packs,  # noqa: F811
                                                              faces_dir, tmp_path):  # fmt: skip
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = make_server(pipeline=pipe, methods={"pulid": str(pulid_dir)}, face_models=str(both_packs))
    wait = WebDriverWait(browser, WAIT)
    browser.get(url + "/")
    wait.until(lambda d: shown(d, "method-box"))
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#method option")]
    assert options == ["IP-Adapter-FaceID", "PuLID v1.1"], options
    Select(browser.find_element(By.ID, "method")).select_by_value("pulid")
    licence = browser.find_element(By.ID, "method-licence").text
    assert "PuLID weights (guozinan/PuLID)" in licence and "EVA02-CLIP-L" in licence, licence
    assert "antelopev2" in licence and "not for commercial use" in licence, licence
    assert browser.find_element(By.ID, "scale").get_attribute("value") == "0.8"  # PuLID's own ID scale
    assert not shown(browser, "identitynet-scale-field") and not shown(browser, "true-cfg-field")  # not PuLID's
    assert shown(browser, "negative-field")  # SDXL has an unconditional pass
    # PuLID's own two: zero tokens and ortho, their defaults from GET /v1/models (the authors' app: 20, v2)
    assert shown(browser, "pulid-num-zero-field") and shown(browser, "pulid-ortho-field")
    assert browser.find_element(By.ID, "pulid-num-zero").get_attribute("placeholder") == "default 20"
    ortho = Select(browser.find_element(By.ID, "pulid-ortho"))
    assert [o.text for o in ortho.options] == ["default v2", "off", "v1", "v2"]
    set_value(browser, "pulid-num-zero", 8)
    ortho.select_by_value("v1")

    enroll_on_page(browser, wait, faces_dir)
    request = {"steps": 2, "width": 48, "height": 32, "seed": 7, "count": 1}
    for field, value in request.items():
        set_value(browser, field, value)
    set_value(browser, "prompt", PROMPT)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: finished(d, "generate-status"))
    assert browser.find_element(By.ID, "generate-status").text.startswith("done"), "the page's generation failed"
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 1)
    caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert "method pulid (zero tokens 8, ortho v1)" in caption and "strength 0.8" in caption, caption
    screenshot(browser, tmp_path, "pulid-1-generated")

    # the same request sent to the API: the same image
    with httpx.Client(base_url=url, timeout=WAIT) as client:
        (page,) = client.get("/v1/generations").json()["generations"]
        settings = page["settings"]
        assert (settings["method"], settings["scale"]) == ("pulid", 0.8), settings
        assert (settings["pulid_num_zero"], settings["pulid_ortho"]) == (8, "v1"), settings
        body = {"identity_id": page["identity_ids"][0], "prompt": PROMPT, "method": "pulid", "scale": 0.8, "seed": 7,
                "num_inference_steps": 2, "width": 48, "height": 32, "num_images_per_prompt": 1,
                "pulid_num_zero": 8, "pulid_ortho": "v1"}  # fmt: skip
        job = client.post("/v1/generations", json=body)
        assert job.status_code == 202, job.text
        api = wait_finished(client, job.json()["id"])
        assert api["status"] == "done", api
        np.testing.assert_array_equal(png(client, page["images"][0]), png(client, api["images"][0]))


def test_web_app_pulid_flux_true_cfg_field_reaches_only_its_job(make_server, browser, flux_folders, both_packs,  # noqa: F811
                                                               faces_dir, tmp_path):  # fmt: skip
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    flux_dir, methods = flux_folders
    flux = FaceIDPipeline.from_pretrained(
        flux_dir, None, methods=methods, device="cpu", progress=False, face_models=both_packs
    )
    net = tmp_path / "flux-canny"  # the server's ControlNet of the FLUX family: the set's ControlNet mode and kind
    make_flux_controlnet(flux.pipe.transformer, seed=11).save_pretrained(net)
    url = make_server(pipeline=flux, methods=methods, face_models=str(both_packs), controlnets={"canny": str(net)})
    wait = WebDriverWait(browser, WAIT)
    browser.get(url + "/")
    wait.until(lambda d: shown(d, "method-box"))
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#method option")]
    assert options == ["InfiniteYou-FLUX v1.0", "PuLID-FLUX v0.9.1"], options
    modes = {
        o.get_attribute("value"): o.get_attribute("disabled")
        for o in Select(browser.find_element(By.ID, "mode")).options
    }
    assert modes["controlnet"] is None and modes["swap"] == "true", modes  # FLUX: its ControlNet, no swap
    kinds = Select(browser.find_element(By.ID, "control-kind")).options
    assert [o.get_attribute("value") for o in kinds] == ["canny"]  # (hidden until the mode is chosen)
    method = Select(browser.find_element(By.ID, "method"))
    assert method.first_selected_option.get_attribute("value") == "infiniteyou"
    assert not shown(browser, "true-cfg-field") and not shown(browser, "negative-field")

    method.select_by_value("pulid-flux")
    assert shown(browser, "true-cfg-field") and not shown(browser, "identitynet-scale-field")
    assert browser.find_element(By.ID, "true-cfg").get_attribute("placeholder") == "default 1 (off)"
    assert "FLUX.1 [dev] Non-Commercial License" in browser.find_element(By.ID, "method-licence").text
    assert not shown(browser, "negative-field")  # true CFG off: FLUX.1's embedded guidance has no negative pass
    set_value(browser, "true-cfg", 2)
    assert shown(browser, "negative-field")  # above 1 the negative prompt applies
    set_value(browser, "negative", "blurry")
    method.select_by_value("infiniteyou")
    assert not shown(browser, "true-cfg-field") and not shown(browser, "negative-field")  # PuLID-FLUX's only
    method.select_by_value("pulid-flux")
    assert shown(browser, "true-cfg-field") and shown(browser, "negative-field")  # the values kept
    assert browser.find_element(By.ID, "true-cfg-range").get_attribute("value") == "2"  # the slider follows
    assert browser.find_element(By.ID, "true-cfg-start").get_attribute("placeholder") == "default 1"
    set_value(browser, "true-cfg-start", 0)
    assert not shown(browser, "pulid-ortho-field")  # PuLID SDXL's, not PuLID-FLUX's

    # PuLID-FLUX compared with InfiniteYou: true CFG and the negative prompt go to PuLID-FLUX's job alone
    enroll_on_page(browser, wait, faces_dir)
    for field, value in {"steps": 2, "width": 32, "height": 32, "count": 1}.items():
        set_value(browser, field, value)
    set_value(browser, "prompt", PROMPT)
    browser.find_element(By.ID, "compare").click()
    assert Select(browser.find_element(By.ID, "compare-method")).first_selected_option.text == "InfiniteYou-FLUX v1.0"
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: finished(d, "generate-status"))  # a refusal (a setting sent to the wrong job) ends it too
    assert browser.find_element(By.ID, "generate-status").text == "done: compared side by side"
    wait.until(lambda d: loaded_images(d, "#comparison img.generated") == 2)
    figures = browser.find_elements(By.CSS_SELECTOR, "#comparison figure.compared")
    assert [f.get_attribute("data-method") for f in figures] == ["pulid-flux", "infiniteyou"]
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 2)
    captions = " | ".join(f.text for f in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption"))
    assert "method pulid-flux (true CFG 2, true CFG from step 0)" in captions, captions
    assert "negative: blurry" in captions, captions
    screenshot(browser, tmp_path, "pulid-flux-compared")

    with httpx.Client(base_url=url, timeout=WAIT) as client:
        listed = client.get("/v1/generations").json()["generations"]
        runs = {}
        for generation in listed:
            view = client.get(f"/v1/generations/{generation['id']}").json()
            assert view["status"] == "done", view
            runs[view["settings"]["method"]] = view["settings"]
    assert set(runs) == {"pulid-flux", "infiniteyou"}, runs
    assert (runs["pulid-flux"]["true_cfg"], runs["pulid-flux"]["negative_prompt"]) == (2.0, "blurry")
    assert runs["pulid-flux"]["true_cfg_start"] == 0
    assert runs["infiniteyou"].get("true_cfg") is None and runs["infiniteyou"]["negative_prompt"] == ""
    assert runs["infiniteyou"].get("true_cfg_start") is None
    assert runs["pulid-flux"]["seed"] == runs["infiniteyou"]["seed"]  # one seed drawn for both
