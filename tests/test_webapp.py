"""The web app at ``/`` in a real browser: a real uvicorn server on the tiny models, Debian's chromium driven
headless through Selenium. Enroll a real photo and see its aligned crop, generate and see the gallery (kept over
a reload), and see the error a photo without a face gives; with API keys, the key the page asks for (a wrong one
refused) loads everything, images included; cancel a queued generation; delete images and generations; live
previews replaced by the final images, the fast mode and identity guidance, the model menu from the catalog; the
mode menu showing each mode's fields, and an img2img generation from an uploaded photo; two people placed by a group
photo with a style reference; each result beside the reference face with its similarity (sorted and filtered by
it), the large view, a mask painted with the mouse for inpainting, the microphone filling the prompt (a fake audio
device, a tiny Whisper), the queue position, sliders, and a phone-sized window without horizontal overflow.
Screenshots go to the test's tmp folder (and to ``FACEID_TEST_ARTIFACTS`` when set). CI installs chromium and chromium-driver (.ci/run); without them this test fails, saying how."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from test_fast import _lora_file  # noqa: E402
from test_serve import Recording  # noqa: E402
from test_serve_live import live_pipe  # noqa: E402, F401 (a fixture)
from test_serve_modes import controlnet_dir, fresh_pipe, side_by_side  # noqa: E402, F401 (fixtures)

from faceid.service import ServeConfig, create_app  # noqa: E402

WAIT = 60  # seconds any wait in this test may take
INSTALL = "install them with: apt-get update && apt-get install -y chromium chromium-driver (CI's .ci/run does)"


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(f"the web app test needs chromium and chromedriver (found {chromium=}, {driver=}): {INSTALL}")
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def make_server(tmp_path, pipe, analyzer, database):
    """``make_server(**config)``: a real uvicorn server (in a thread) on the tiny models (or ``pipeline``), its data
    in ``tmp_path/data`` and the test's ``database``; its base URL. Stopped after the test."""
    running = []

    def make(pipeline=None, **options) -> str:
        options.setdefault("database_url", database.url(tmp_path / "data"))
        config = ServeConfig(data_dir=tmp_path / "data", pipeline=pipeline or pipe, analyzer=analyzer, **options)
        app = create_app(config)
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        running.append((srv, thread))
        deadline = time.monotonic() + WAIT
        while not srv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield make
    for srv, thread in running:
        srv.should_exit = True
        thread.join(WAIT)


@pytest.fixture
def server(make_server):
    """A server without API keys; its base URL."""
    return make_server()


def launch_browser(*extra: str):
    """Headless chromium through chromedriver, with the ``extra`` command line switches."""
    chromium, driver_path = browser_binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the web app test needs selenium: pip install -e '.[test]' (it pins selenium)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1100",
        *extra,
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT)
    return driver


@pytest.fixture
def browser():
    driver = launch_browser()
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"webapp-{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("FACEID_TEST_ARTIFACTS"):
        folder = Path(os.environ["FACEID_TEST_ARTIFACTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    return path


def loaded_images(driver, selector: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0).length",
        selector,
    )


def set_value(driver, element_id: str, value) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(str(value))


def click(driver, selector: str) -> bool:
    """Click the element ``selector`` if it is there now; False (to wait and try again) if it is not, or was
    redrawn between finding and clicking it."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        driver.find_element(By.CSS_SELECTOR, selector).click()
    except (NoSuchElementException, StaleElementReferenceException):
        return False
    return True


def image_files(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "images").iterdir())


def enroll_and_generate(driver, wait, faces_dir, images: int) -> None:
    """Enroll obama.jpg (its crop shows) and generate ``images`` tiny images (they show in the gallery)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    driver.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    for field, value in {"steps": 2, "width": 24, "height": 16, "seed": 7, "count": images}.items():
        set_value(driver, field, value)
    driver.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == images)


def test_web_app_enroll_generate_and_no_face_error(server, browser, faces_dir, tmp_path, pipe):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    browser.get(server + "/")
    assert browser.title == "faceid"
    wait.until(lambda d: d.find_element(By.ID, "model").text.strip() not in ("",))
    assert not browser.find_element(By.ID, "key-form").is_displayed()  # no key to ask for
    option = browser.find_element(By.CSS_SELECTOR, "#model option")  # a short label, the whole source as its title
    assert (option.text, option.get_attribute("title")) == (Path(pipe.base_model).name, str(pipe.base_model))
    assert not browser.find_element(By.ID, "method-box").is_displayed()  # faceid alone: no method menu

    # enroll a real photo: its aligned crop appears, and the person is chosen and in the library
    set_value(browser, "name", "Barack <b>Obama</b>")  # shown as text, never as markup
    browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    wait.until(lambda d: loaded_images(d, "#library img") == 1)
    assert "Barack <b>Obama</b>" in browser.find_element(By.ID, "selected").text
    assert "Barack <b>Obama</b>" in browser.find_element(By.ID, "library").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#library b")
    screenshot(browser, tmp_path, "1-enrolled")

    # generate two tiny images: progress, then the gallery with settings, download links and "same seed again"
    for field, value in {"steps": 2, "width": 24, "height": 16, "seed": 7, "count": 2}.items():
        set_value(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 2)
    assert browser.find_element(By.ID, "generate-status").text.startswith("done: 2 images")
    captions = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")]
    assert any("seed 7" in c for c in captions) and any("seed 8" in c for c in captions), captions
    assert all("steps 2" in c and "24×16" in c for c in captions), captions
    links = browser.find_elements(By.CSS_SELECTOR, "#gallery a[download]")
    assert len(links) == 2 and all(a.get_attribute("href").startswith("blob:") for a in links)
    screenshot(browser, tmp_path, "2-generated")
    browser.find_elements(By.CSS_SELECTOR, "#gallery button.again")[0].click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 3)
    first = browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")[0].text
    assert "seed 7" in first or "seed 8" in first, first
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .generation")) == 2

    # a reload keeps the gallery: it comes from GET /v1/generations, newest first
    browser.refresh()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 3)
    assert [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#gallery figcaption")][1:] == captions

    # a photo without a face: the server's error is on the page
    gray = tmp_path / "gray.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(gray)
    browser.find_element(By.ID, "photos").send_keys(str(gray))
    browser.find_element(By.ID, "enroll").click()
    status = browser.find_element(By.ID, "enroll-status")
    wait.until(lambda d: "error" in status.get_attribute("class") and status.text)
    assert "photos[0] ('gray.png'): no face found" in status.text, status.text  # the only photo sent
    screenshot(browser, tmp_path, "3-no-face")
    print("screenshots in", tmp_path)


def test_web_app_with_api_key_and_deleting(make_server, browser, faces_dir, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    url = make_server(api_keys=("key-a",))
    data = tmp_path / "data"
    browser.get(url + "/")
    key_status = browser.find_element(By.ID, "key-status")
    wait.until(lambda d: "needs an API key" in key_status.text)
    assert browser.find_element(By.ID, "key-form").is_displayed()
    assert "enter the API key first" in browser.find_element(By.ID, "library").text

    # a wrong key: refused, saying so
    set_value(browser, "api-key", "wrong-key")
    browser.find_element(By.ID, "use-key").click()
    wait.until(lambda d: "error" in key_status.get_attribute("class") and "refused this API key" in key_status.text)
    assert "models unavailable" in browser.find_element(By.ID, "model").text
    screenshot(browser, tmp_path, "4-wrong-key")

    # the right key: everything loads with it, the crop and the images too (an <img src> without it gets 401)
    set_value(browser, "api-key", "key-a")
    browser.find_element(By.ID, "use-key").click()
    wait.until(lambda d: key_status.text == "key accepted")
    assert browser.execute_script("return sessionStorage.getItem('faceid-api-key')") == "key-a"
    assert browser.execute_script("return localStorage.getItem('faceid-api-key')") is None
    enroll_and_generate(browser, wait, faces_dir, images=2)
    wait.until(lambda d: loaded_images(d, "#gallery img.reference") == 2)  # each image beside the person's crop
    sources = [i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, "#gallery img, #crops img")]
    assert len(sources) == 5 and all(src.startswith("blob:") for src in sources), sources
    assert len(image_files(data)) == 2

    # a reload: the key is kept for the tab, the gallery comes back
    browser.refresh()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 2)
    assert browser.find_element(By.ID, "key-status").text == "key accepted"
    screenshot(browser, tmp_path, "5-keyed-gallery")

    # delete one image: gone from the page, the data dir and the API; the other stays
    figures = browser.find_elements(By.CSS_SELECTOR, "#gallery figure")
    dropped, kept = (f.find_element(By.CSS_SELECTOR, "a[download]").get_attribute("download") for f in figures)
    figures[0].find_element(By.CSS_SELECTOR, "button.delete-image").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 1)
    assert image_files(data) == [kept]
    key = {"Authorization": "Bearer key-a"}
    assert httpx.get(f"{url}/v1/images/{dropped}", headers=key).status_code == 404
    assert httpx.get(f"{url}/v1/images/{kept}", headers=key).status_code == 200

    # delete the generation: its entry, its last image and its row go
    job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")
    browser.find_element(By.CSS_SELECTOR, "#gallery button.delete-generation").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#gallery .generation"))
    assert image_files(data) == []
    assert httpx.get(f"{url}/v1/generations/{job}", headers=key).status_code == 404
    assert "generated images appear here" in browser.find_element(By.ID, "gallery").text
    assert browser.find_element(By.ID, "gallery-status").text == "generation deleted"


def test_web_app_cancels_a_queued_generation(make_server, browser, faces_dir, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT)
    url = make_server(start_workers=False)  # jobs stay queued
    browser.get(url + "/")
    browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    set_value(browser, "steps", 2)
    browser.find_element(By.ID, "generate").click()
    entry = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .generation[data-status=queued]"))[0]
    job = entry.get_attribute("data-id")
    assert httpx.get(f"{url}/v1/generations/{job}").json()["status"] == "queued"
    # the queue position before the job starts (the only one queued: next in line)
    progress = browser.find_element(By.ID, "progress-text")
    wait.until(lambda d: "position 1 in the queue" in progress.text)
    assert httpx.get(f"{url}/v1/generations/{job}").json()["queue_position"] == 0
    assert "position 1 in the queue" in entry.find_element(By.CSS_SELECTOR, ".gen-status").text
    screenshot(browser, tmp_path, "6-queued")

    entry.find_element(By.CSS_SELECTOR, "button.cancel").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .generation[data-status=cancelled]"))
    assert httpx.get(f"{url}/v1/generations/{job}").json()["status"] == "cancelled"
    status = browser.find_element(By.ID, "generate-status")
    wait.until(lambda d: status.text == "generation cancelled")
    assert browser.find_element(By.ID, "generate").is_enabled()  # ready for the next one
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery button.cancel")  # a Delete button instead
    browser.find_element(By.CSS_SELECTOR, "#gallery button.delete-generation").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#gallery .generation"))
    assert httpx.get(f"{url}/v1/generations/{job}").status_code == 404

    # a queued generation the page finds on loading (GET /v1/generations) can be cancelled too
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .generation[data-status=queued]"))
    browser.refresh()
    entry = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .generation[data-status=queued]"))[0]
    job = entry.get_attribute("data-id")
    # The gallery may draw the entry again while it loads: find and click in one go, again if it was redrawn.
    wait.until(lambda d: click(d, f"#gallery .generation[data-id='{job}'] button.cancel"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .generation[data-status=cancelled]"))
    assert httpx.get(f"{url}/v1/generations/{job}").json()["status"] == "cancelled"


def test_web_app_live_previews_fast_mode_and_the_catalog(make_server, browser, faces_dir, tmp_path, live_pipe):  # noqa: F811
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from faceid.errors import FaceIDError

    def no_loads(device, models):
        raise FaceIDError("this test loads no other model set")

    go = threading.Event()  # the first generation waits after its first preview until the page has shown it
    recording = Recording(live_pipe, after_preview=lambda step: go.wait(WAIT))
    # the fast presets: LCM from a local LoRA (no download), SDXL-Lightning for the SDXL set only (loaded with it)
    fast = {"lcm": str(_lora_file(live_pipe, "lcm", tmp_path)), "lightning": None}
    # the catalog: the loaded SD1.5 set, and an SDXL set a worker would load on first use
    url = make_server(
        pipeline=recording, preview_every=1, loader=no_loads, catalog=({}, {"adapter": "faceid-sdxl"}), fast=fast
    )
    wait = WebDriverWait(browser, WAIT)
    browser.get(url + "/")

    # the model menu lists the catalog, the unloaded set too; SDXL-Lightning only for the SDXL one
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
    labels = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert "(SD1.5)" in labels[0] and "(SDXL, loads on first use)" in labels[1], labels
    lightning = browser.find_element(By.CSS_SELECTOR, "#fast option[value=lightning]")
    assert not lightning.is_enabled()
    Select(browser.find_element(By.ID, "model")).select_by_index(1)
    assert lightning.is_enabled()
    Select(browser.find_element(By.ID, "model")).select_by_index(0)
    assert not lightning.is_enabled()

    # a generation: its preview shows while it runs, and the final image replaces it
    browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    for field, value in {"steps": 3, "width": 24, "height": 16, "seed": 7, "count": 1}.items():
        set_value(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#previews img.preview") == 1)
    preview = browser.find_element(By.CSS_SELECTOR, "#previews img.preview")
    assert preview.get_attribute("src").startswith("data:image/jpeg;base64,")
    assert preview.get_attribute("title") == "image 1 at step 1 of 3"
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img.generated")  # still running
    screenshot(browser, tmp_path, "7-preview")
    go.set()
    wait.until(lambda d: loaded_images(d, "#previews img.final") == 1 and loaded_images(d, "#gallery img.generated"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#previews img.preview")
    assert browser.find_element(By.CSS_SELECTOR, "#previews img.final").get_attribute("src").startswith("blob:")
    screenshot(browser, tmp_path, "8-final")

    # fast mode with identity guidance, Steps left empty: the preset's 4 steps
    Select(browser.find_element(By.ID, "fast")).select_by_value("lcm")
    browser.find_element(By.ID, "steps").clear()
    assert "4" in browser.find_element(By.ID, "steps").get_attribute("placeholder")
    set_value(browser, "identity-guidance", 0.5)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 2)
    job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")  # the newest
    settings = httpx.get(f"{url}/v1/generations/{job}").json()["settings"]
    assert (settings["fast"], settings["num_inference_steps"], settings["identity_guidance"]) == ("lcm", 4, 0.5)
    assert "fast lcm" in browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text


def test_web_app_modes_show_their_fields_and_run_img2img(make_server, browser, faces_dir, tmp_path, controlnet_dir):  # noqa: F811
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = make_server(controlnets={"canny": str(controlnet_dir)})
    wait = WebDriverWait(browser, WAIT)
    browser.get(url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#control-kind option"))
    mode = Select(browser.find_element(By.ID, "mode"))
    assert [o.get_attribute("value") for o in mode.options if o.is_enabled()] == [
        "text-to-image", "img2img", "inpaint", "controlnet", "swap"
    ]  # fmt: skip
    kinds = Select(browser.find_element(By.ID, "control-kind")).options  # hidden until ControlNet is chosen
    assert [o.get_attribute("value") for o in kinds] == ["canny"]

    def shown() -> set[str]:
        """The input fields on show: the upload slots, strength and width."""
        names = {f"{slot}-file" for slot in ("init", "mask", "control", "target")} | {"strength", "width"}
        return {name for name in names if browser.find_element(By.ID, name).is_displayed()}

    expected = {
        "text-to-image": {"width"},
        "img2img": {"init-file", "strength", "width"},
        "inpaint": {"init-file", "mask-file", "strength", "width"},
        "controlnet": {"control-file", "width"},
        "swap": {"target-file", "mask-file", "strength"},
    }
    for value, fields in expected.items():
        mode.select_by_value(value)
        assert shown() == fields, value
    assert browser.find_element(By.ID, "control-scale").is_displayed() is False  # swap: no ControlNet fields
    browser.find_element(By.ID, "generate").click()  # swap with no person and no target: said
    wait.until(lambda d: "choose a person first" in d.find_element(By.ID, "generate-status").text)

    # img2img: the uploaded photo's thumbnail is the server's upright copy; the image has its size
    browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    mode.select_by_value("img2img")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: "choose the image to redraw first" in d.find_element(By.ID, "generate-status").text)
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated
    Image.new("RGB", (40, 24), (200, 120, 40)).save(sideways, exif=exif)
    browser.find_element(By.ID, "init-file").send_keys(str(sideways))
    wait.until(lambda d: loaded_images(d, '[data-slot="init"] img.thumb') == 1)
    assert browser.find_element(By.CSS_SELECTOR, '[data-slot="init"] figcaption').text == "24×40"
    for field, value in {"steps": 2, "seed": 7, "count": 1, "strength": 0.5}.items():
        set_value(browser, field, value)
    for field in ("width", "height"):
        browser.find_element(By.ID, field).clear()
    assert browser.find_element(By.ID, "width").get_attribute("placeholder") == "the image's"
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 1)
    assert "img2img 0.5" in browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")
    view = httpx.get(f"{url}/v1/generations/{job}").json()
    assert (view["mode"], view["settings"]["width"], view["settings"]["height"]) == ("img2img", 24, 40)
    assert view["inputs"]["init_image"] == httpx.get(f"{url}/v1/uploads").json()[0]["id"]
    screenshot(browser, tmp_path, "9-img2img")


def test_web_app_two_people_from_a_group_photo_with_a_style_reference(
    make_server,
    browser,
    faces_dir,
    tmp_path,
    fresh_pipe,  # noqa: F811 (a fixture)
    tiny_models,
):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    style = {"tiny": str(tiny_models.reference("plain"))}
    url = make_server(pipeline=fresh_pipe, style_adapters=style, reference_encoder=str(tiny_models.image_encoder))
    people = []
    for name in ("obama.jpg", "biden.jpg"):  # enrolled through the API: the page's enrolment is tested above
        files = [("photos", (name, (faces_dir / name).read_bytes(), "image/jpeg"))]
        people.append(httpx.post(f"{url}/v1/identities", files=files, data={"name": name[:-4]}).json()["id"])
    wait = WebDriverWait(browser, WAIT)
    browser.get(url + "/")
    wait.until(lambda d: loaded_images(d, "#library img") == 2)
    assert not browser.find_element(By.ID, "people").is_displayed()

    # several people: each click in the library adds the next one, left to right (the library is newest first)
    browser.find_element(By.ID, "group").click()
    persons = {p.get_attribute("data-id"): p for p in browser.find_elements(By.CSS_SELECTOR, "#library .person")}
    for identity in people:
        persons[identity].click()
    assert [li.text.split()[0] for li in browser.find_elements(By.CSS_SELECTOR, "#people li")] == ["obama", "biden"]
    Select(browser.find_element(By.ID, "regions")).select_by_value("photo")
    group = tmp_path / "pair.png"
    side_by_side(faces_dir, "obama.jpg", "biden.jpg").save(group)
    browser.find_element(By.ID, "regions-file").send_keys(str(group))
    wait.until(lambda d: loaded_images(d, '[data-slot="regions"] img.thumb') == 1)

    # a style reference: its image, the server's adapter, a strength
    browser.find_element(By.ID, "add-style").click()
    assert [o.text for o in Select(browser.find_element(By.CSS_SELECTOR, ".style-adapter")).options] == ["tiny"]
    browser.find_element(By.CSS_SELECTOR, ".style-file").send_keys(str(faces_dir / "obama2.jpg"))
    wait.until(lambda d: loaded_images(d, ".style-row img.thumb") == 1)
    browser.execute_script(
        "const s = document.querySelector('.style-scale'); s.value = '0.8'; s.dispatchEvent(new Event('input'))"
    )
    for field, value in {"steps": 2, "width": 24, "height": 16, "seed": 5, "count": 1}.items():
        set_value(browser, field, value)
    browser.find_element(By.ID, "generate").click()
    status = browser.find_element(By.ID, "generate-status")
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 1 or "error" in status.get_attribute("class"))
    assert loaded_images(browser, "#gallery img.generated") == 1, status.text
    caption = browser.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert "2 people" in caption and "style tiny 0.8" in caption, caption
    job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")
    view = httpx.get(f"{url}/v1/generations/{job}").json()
    assert view["inputs"]["people"] == people and set(view["inputs"]["regions"]) == {"photo"}
    assert len(view["settings"]["regions"]) == 2 and view["settings"]["style"] == [{"adapter": "tiny", "scale": 0.8}]
    browser.execute_script("document.getElementById('group-box').scrollIntoView()")
    screenshot(browser, tmp_path, "10-two-people-style")


def test_web_app_offers_only_what_the_server_runs_and_errors_fit_their_card(
    make_server,
    browser,
    faces_dir,
    tmp_path,
    live_pipe,  # noqa: F811
):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT)

    def values(select_id: str, enabled_only: bool = True) -> list[str]:
        """The menu's option values, read in one script (the page may replace the options between two reads)."""
        return browser.execute_script(
            "return [...document.getElementById(arguments[0]).options]"
            ".filter(o => !o.disabled || !arguments[1]).map(o => o.value)",
            select_id,
            enabled_only,
        )

    # a server without a few-step preset, a tiny VAE, a ControlNet or a style adapter: none of them is offered
    bare = make_server()
    browser.get(bare + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option[value='0']"))
    assert values("fast", enabled_only=False) == [""] and not browser.find_element(By.ID, "fast").is_displayed()
    assert not browser.find_element(By.ID, "decoder").is_displayed()
    assert values("mode") == ["text-to-image", "img2img", "inpaint", "swap"]  # no ControlNet on this server
    assert not browser.find_element(By.ID, "add-style").is_displayed()
    assert not browser.find_element(By.ID, "mic").is_displayed()  # no speech model, no microphone
    screenshot(browser, tmp_path, "11-bare-server")

    # a long error (a photo without a face, its long file name quoted) wraps inside its card
    gray = tmp_path / ("a_photo_without_any_face_" * 6 + ".png")  # no break opportunity in 80 characters
    Image.new("RGB", (256, 256), (128, 128, 128)).save(gray)
    browser.find_element(By.ID, "photos").send_keys(str(gray))
    browser.find_element(By.ID, "enroll").click()
    status = browser.find_element(By.ID, "enroll-status")
    wait.until(lambda d: "error" in status.get_attribute("class") and status.text)
    assert "no face found" in status.text and "a_photo_without_any_face_a_photo" in status.text, status.text
    sizes = browser.execute_script(
        "const s = document.getElementById('enroll-status'), card = document.getElementById('person');"
        "const r = s.getBoundingClientRect(), c = card.getBoundingClientRect();"
        "return {scroll: s.scrollWidth, client: s.clientWidth, right: r.right, cardRight: c.right,"
        " cardScroll: card.scrollWidth, cardClient: card.clientWidth, lines: r.height / parseFloat(getComputedStyle(s).lineHeight)}"
    )
    screenshot(browser, tmp_path, "12-long-error")
    assert sizes["scroll"] <= sizes["client"] and sizes["right"] <= sizes["cardRight"], sizes
    assert sizes["cardScroll"] <= sizes["cardClient"] and sizes["lines"] > 1.5, sizes  # wrapped onto lines

    # a server with a tiny VAE and the LCM preset: both offered, and a generation with them runs
    lora = str(_lora_file(live_pipe, "lcm", tmp_path))
    equipped = make_server(pipeline=live_pipe, fast={"lcm": lora})
    browser.get(equipped + "/")
    wait.until(lambda d: len(values("fast", enabled_only=False)) == 2)
    assert values("fast") == ["", "lcm"] and values("decoder") == ["full", "tiny"]
    assert browser.find_element(By.ID, "decoder").is_displayed()
    browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
    browser.find_element(By.ID, "enroll").click()
    wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
    for field, value in {"width": 24, "height": 16, "seed": 7, "count": 1}.items():
        set_value(browser, field, value)
    Select(browser.find_element(By.ID, "fast")).select_by_value("lcm")
    Select(browser.find_element(By.ID, "decoder")).select_by_value("tiny")
    browser.find_element(By.ID, "steps").clear()
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 1)
    job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")
    settings = httpx.get(f"{equipped}/v1/generations/{job}").json()["settings"]
    assert (settings["fast"], settings["decoder"], settings["num_inference_steps"]) == ("lcm", "tiny", 4)
    screenshot(browser, tmp_path, "13-fast-and-tiny-decoder")


class CountingTranscriber:
    """A transcriber that records what it was asked and what it answered."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.calls = inner, inner.name, []

    def __call__(self, audio: bytes, language=None, prompt=None) -> str:
        text = self.inner(audio, language=language, prompt=prompt)
        self.calls.append((audio, text))
        return text


def write_tone(path: Path, seconds: float = 1.0, rate: int = 16_000) -> Path:
    """A short mono 16-bit WAV: a tone, what the fake microphone plays (in a loop)."""
    import math
    import struct
    import wave

    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        samples = (int(12000 * math.sin(2 * math.pi * 440 * t / rate)) for t in range(int(seconds * rate)))
        out.writeframes(b"".join(struct.pack("<h", v) for v in samples))
    return path


def js_fixed(value: float, digits: int = 2) -> str:
    """``value.toFixed(digits)`` as JavaScript writes it (rounding the exact binary value half up)."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def test_web_app_likeness_drawn_mask_microphone_and_phone_layout(make_server, pipe, faces_dir, tmp_path, tiny_models):
    """Each result beside its person's reference face with its identity similarity (the job view's scores), the
    gallery sorted and filtered by it, the large view; a mask painted with the mouse used for inpainting; the
    microphone (a fake audio device playing a WAV) filling the prompt with the server's transcription (the tiny
    random Whisper); sliders bounded by the server's limits; a phone-sized window without horizontal overflow."""
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from test_serve import ShowingFaces
    from tiny_models import make_tiny_whisper

    from faceid.speech import Transcriber

    transcriber = CountingTranscriber(Transcriber.from_pretrained(make_tiny_whisper(tmp_path / "whisper")))
    shown = [faces_dir / "biden.jpg", faces_dir / "obama2.jpg"]  # image 0 less like obama than image 1
    url = make_server(pipeline=ShowingFaces(pipe, shown), transcriber=transcriber, max_side=128)
    tone = write_tone(tmp_path / "tone.wav")
    browser = launch_browser(
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={tone}",
    )
    try:
        wait = WebDriverWait(browser, WAIT)
        browser.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "mic").is_displayed())

        # sliders beside the number fields, bounded by the server's limits; a slider sets its field
        assert browser.find_element(By.ID, "width-range").get_attribute("max") == "128"
        steps_max = httpx.get(f"{url}/v1/models").json()["limits"]["max_steps"]
        assert browser.find_element(By.ID, "steps-range").get_attribute("max") == str(steps_max)
        browser.execute_script(
            "const r = document.getElementById('guidance-range'); r.value = '3.5'; r.dispatchEvent(new Event('input'))"
        )
        assert browser.find_element(By.ID, "guidance").get_property("value") == "3.5"

        # the microphone: record from the fake device, stop, and the prompt is what the server transcribed
        browser.find_element(By.ID, "mic").click()
        mic = browser.find_element(By.ID, "mic")
        wait.until(lambda d: int(mic.get_attribute("data-recorded") or 0) >= 1)  # some audio came in
        mic.click()
        mic_status = browser.find_element(By.ID, "mic-status")
        wait.until(lambda d: mic_status.text.startswith("transcribed") or "error" in mic_status.get_attribute("class"))
        assert mic_status.text.startswith("transcribed"), mic_status.text
        assert len(transcriber.calls) == 1
        audio, answer = transcriber.calls[0]
        assert audio[:4] == b"\x1aE\xdf\xa3"  # what MediaRecorder made: WebM
        prompt = browser.find_element(By.ID, "prompt").get_property("value")
        assert prompt == answer.replace("\r\n", "\n").replace("\r", "\n"), (prompt, answer)  # a textarea's newlines

        # an example prompt, then two images scored against the person, each beside the reference face
        browser.find_elements(By.CSS_SELECTOR, "#examples button.example")[1].click()
        assert "astronaut" in browser.find_element(By.ID, "prompt").get_property("value")
        browser.find_element(By.ID, "photos").send_keys(str(faces_dir / "obama.jpg"))
        browser.find_element(By.ID, "enroll").click()
        wait.until(lambda d: loaded_images(d, "#crops img.crop") == 1)
        for field, value in {"steps": 1, "width": 128, "height": 128, "seed": 7, "count": 2}.items():
            set_value(browser, field, value)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 2)
        wait.until(lambda d: loaded_images(d, "#gallery img.reference") == 2)
        job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")
        view = httpx.get(f"{url}/v1/generations/{job}").json()
        scores = [score["similarity"] for score in view["scores"]]
        assert scores[0] < scores[1], scores
        figures = browser.find_elements(By.CSS_SELECTOR, "#gallery figure.result")
        shown_values = [f.find_element(By.CSS_SELECTOR, ".similarity").text for f in figures]
        assert shown_values == [js_fixed(s) for s in scores]
        assert [float(f.get_attribute("data-similarity")) for f in figures] == scores
        identity = view["identity_ids"][0]
        crop = httpx.get(f"{url}/v1/identities/{identity}").json()["faces"][0]["crop_url"]
        references = browser.find_elements(By.CSS_SELECTOR, "#gallery img.reference")
        crop_bytes = httpx.get(url + crop).content
        blob = browser.execute_async_script(
            "const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer())"
            ".then(b => done(Array.from(new Uint8Array(b))))",
            references[0].get_attribute("src"),
        )
        assert bytes(blob) == crop_bytes  # the reference is the person's crop
        browser.execute_script("document.getElementById('gallery').scrollIntoView()")
        screenshot(browser, tmp_path, "14-likeness")

        def on_screen() -> list[float]:
            """The similarities of the images on show, in reading order."""
            shown = [f for f in browser.find_elements(By.CSS_SELECTOR, "#gallery figure.result") if f.is_displayed()]
            shown.sort(key=lambda f: (round(f.rect["y"]), f.rect["x"]))
            return [float(f.get_attribute("data-similarity")) for f in shown]

        assert on_screen() == scores  # newest first: in the generation's order
        Select(browser.find_element(By.ID, "gallery-order")).select_by_value("alike")
        assert on_screen() == sorted(scores, reverse=True)
        threshold = round((scores[0] + scores[1]) / 2, 2)
        browser.execute_script(
            "const r = document.getElementById('min-similarity'); r.step = 'any'; r.value = arguments[0];"
            "r.dispatchEvent(new Event('input'))",
            threshold,
        )
        assert on_screen() == [scores[1]]
        browser.execute_script(
            "const r = document.getElementById('min-similarity'); r.value = 0; r.dispatchEvent(new Event('input'))"
        )
        Select(browser.find_element(By.ID, "gallery-order")).select_by_value("newest")
        assert on_screen() == scores

        # the large view: the image with its settings and similarity
        browser.find_elements(By.CSS_SELECTOR, "#gallery img.generated")[1].click()
        lightbox = browser.find_element(By.ID, "lightbox")
        wait.until(lambda d: lightbox.is_displayed())
        assert js_fixed(scores[1]) in browser.find_element(By.ID, "lightbox-similarity").text
        assert "steps 1" in browser.find_element(By.ID, "lightbox-caption").text
        large = browser.find_element(By.ID, "lightbox-image")
        assert large.size["width"] > 2 * figures[1].find_element(By.CSS_SELECTOR, "img.generated").size["width"]
        screenshot(browser, tmp_path, "15-large-view")
        browser.find_element(By.ID, "lightbox-close").click()
        wait.until(lambda d: not lightbox.is_displayed())

        # inpainting with a mask painted on the image: the stroke is white in the uploaded mask, the rest black
        Select(browser.find_element(By.ID, "mode")).select_by_value("inpaint")
        photo = tmp_path / "flat.png"
        Image.new("RGB", (64, 48), (90, 140, 200)).save(photo)
        browser.find_element(By.ID, "init-file").send_keys(str(photo))
        canvas = browser.find_element(By.ID, "mask-canvas")
        wait.until(lambda d: canvas.is_displayed() and canvas.get_property("width") == 64)
        browser.execute_script(
            "const r = document.getElementById('brush-size'); r.value = '40'; r.dispatchEvent(new Event('input'))"
        )
        w, h = canvas.size["width"], canvas.size["height"]
        (
            ActionChains(browser)
            .move_to_element_with_offset(canvas, -w // 4, -h // 4)  # from the centre: a quarter in
            .click_and_hold()
            .move_by_offset(w // 8, 0)
            .move_by_offset(0, h // 8)
            .release()
            .perform()
        )
        set_value(browser, "count", 1)
        for field in ("width", "height"):
            browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 3)
        job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")
        view = httpx.get(f"{url}/v1/generations/{job}").json()
        assert view["mode"] == "inpaint" and view["inputs"]["mask_image"] != view["inputs"]["init_image"]
        uploads = {u["id"]: u for u in httpx.get(f"{url}/v1/uploads").json()}
        drawn = uploads[view["inputs"]["mask_image"]]
        mask = Image.open(BytesIO(httpx.get(url + drawn["url"]).content)).convert("L")
        assert mask.size == (64, 48)
        for x, y in ((16, 12), (24, 12), (24, 18)):  # along the stroke (image pixels)
            assert mask.getpixel((x, y)) > 200, (x, y)
        for x, y in ((48, 36), (60, 4), (4, 44)):  # far from it
            assert mask.getpixel((x, y)) < 30, (x, y)
        browser.execute_script("document.getElementById('mask-editor').scrollIntoView()")
        screenshot(browser, tmp_path, "16-drawn-mask")

        # swap with a mask painted on the target photo: the editor shows the target, the request carries the mask
        Select(browser.find_element(By.ID, "mode")).select_by_value("swap")
        wait.until(lambda d: "only what you paint" in d.find_element(By.ID, "mask-hint").text)
        assert canvas.get_property("width") != 64 or not canvas.is_displayed()  # the inpainting image is gone
        target = tmp_path / "target.jpg"
        Image.open(faces_dir / "obama.jpg").convert("RGB").resize((96, 120)).save(target)
        browser.find_element(By.ID, "target-file").send_keys(str(target))
        wait.until(lambda d: canvas.is_displayed() and canvas.get_property("width") == 96)
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)  # all of the stroke on screen
        w, h = canvas.size["width"], canvas.size["height"]
        ActionChains(browser).move_to_element_with_offset(canvas, 0, 0).click_and_hold().move_by_offset(
            w // 8, 0
        ).release().perform()  # across the centre
        screenshot(browser, tmp_path, "16b-swap-mask")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: loaded_images(d, "#gallery img.generated") == 4)  # the crop at max_side, 128
        job = browser.find_element(By.CSS_SELECTOR, "#gallery .generation").get_attribute("data-id")
        view = httpx.get(f"{url}/v1/generations/{job}").json()
        assert view["mode"] == "swap" and view["status"] == "done", view
        uploads = {u["id"]: u for u in httpx.get(f"{url}/v1/uploads").json()}
        drawn = uploads[view["inputs"]["swap"]["mask"]]
        swap_mask = Image.open(BytesIO(httpx.get(url + drawn["url"]).content)).convert("L")
        assert swap_mask.size == (96, 120)
        assert swap_mask.getpixel((48 + 6, 60)) > 200 and swap_mask.getpixel((4, 4)) < 30

        # a phone (360 pixels wide, as many Android phones): one column, nothing wider than the screen
        browser.set_window_size(360, 780)
        wait.until(lambda d: d.execute_script("return window.innerWidth") <= 360)
        overflow = browser.execute_script(
            "const e = document.documentElement, w = e.clientWidth;"
            "const out = [...document.querySelectorAll('body *')].filter(n => n.getBoundingClientRect().right > w + 0.5);"
            "return [e.scrollWidth, w, document.body.scrollWidth, out.map(n => n.tagName + '#' + n.id + '.' + n.className)]"
        )
        browser.execute_script("document.getElementById('gallery').scrollIntoView()")
        screenshot(browser, tmp_path, "17-phone")
        assert overflow[0] <= overflow[1] and overflow[2] <= overflow[1] and not overflow[3], overflow
        cards = browser.find_elements(By.CSS_SELECTOR, "main > .card")
        assert len({round(card.rect["x"]) for card in cards}) == 1  # stacked
    finally:
        browser.quit()
