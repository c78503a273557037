"""The web page at `/` (deployments/api/static/), end to end in headless Chromium from Debian's
packages (`chromium`, `chromium-driver`; .ci/run installs them), driven by Selenium against the
tiny profile served in cluster mode with API keys on. Experts are slowed to 0.25 s a step and
lip-sync to 0.3 s a batch, so progress, cancellation and streaming are seen as a person would.

Screenshots of each state go to tests/artifacts/web/ (or $AVATAR_SERVE_ARTIFACTS/web/).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from helpers import HANG_S, get_dummy_image, png_bytes, served_graph, wait_final, wav_bytes

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "deployments" / "api" / "static"
ARTIFACTS = Path(os.environ.get("AVATAR_SERVE_ARTIFACTS", ROOT / "tests" / "artifacts")) / "web"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
KEY = "web-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEP_S = 0.25
pytestmark = [pytest.mark.browser, pytest.mark.cluster]  # the page is served by a Ray cluster

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)", allow_module_level=True)
from selenium import webdriver  # noqa: E402 - a test dependency (pyproject test extra): no skip
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def overrides(storage: Path) -> dict:
    stages = {"high": {"simulate_step_seconds": STEP_S}, "low": {"simulate_step_seconds": STEP_S},
              "lipsync": {"simulate_batch_seconds": 0.3, "avatar_cache_dir": str(storage / "avatars")}}
    return {"stages": stages, "limits": {"max_steps": 40},
            "serving": {"storage_dir": str(storage), "api_keys": [KEY], "max_running_jobs": 2,
                        "max_queued_jobs": 1, "retry_after_s": 2}}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with served_graph(overrides(tmp_path_factory.mktemp("store"))) as base:
        yield base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    paths = {"portrait": folder / "portrait.png", "bad": folder / "notes.png", "speech": folder / "hello.wav"}
    paths["portrait"].write_bytes(png_bytes(get_dummy_image(3, width=64, height=64)))
    paths["bad"].write_bytes(b"these are notes, not a picture")
    paths["speech"].write_bytes(wav_bytes(4.0))
    return paths


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--mute-audio"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, name: str, show: str | None = None) -> None:
    """A screenshot of the page as it is, scrolled to the element `show` (an id) when given."""
    if show:
        driver.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'center'})", show)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(driver, condition, timeout: float = HANG_S, message: str = ""):
    """Poll until `condition` holds. The bound only turns a hang into a failure (a page that never
    gets there), never a speed claim: the longer ones cover a diffusion or a talk turn on a loaded
    two-core machine."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def open_page(driver, url: str, key: str | None = KEY, tab: str = "tab-video") -> None:
    """Load the page fresh, enter `key` and wait until the page says it was accepted."""
    driver.get(url + "/")
    js(driver, "sessionStorage.clear()")
    driver.get(url + "/")
    if key is not None:
        field = driver.find_element(By.ID, "api-key")
        field.clear()
        field.send_keys(key)
        driver.find_element(By.ID, "key-save").click()
        wait(driver, lambda d: "accepted" in text(d, "key-status"), message="the key was not accepted")
    driver.find_element(By.ID, tab).click()


# ------------------------------------------------------------------ served, public, offline


def test_the_page_is_public_and_loads_nothing_from_outside(url):
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in ("app.js", "style.css"):
        r = httpx.get(f"{url}/static/{name}")
        assert r.status_code == 200 and r.text == (STATIC / name).read_text()
    assert httpx.get(url + "/static/missing.js").json()["error"]["type"] == "not_found_error"
    # No CDN, no fonts from elsewhere: every URL in the page's files is on this host.
    for path in (p for p in STATIC.iterdir() if p.is_file()):  # the page's own files (docs/: test_openapi.py)
        assert not re.search(r"https?://|//cdn|@import", path.read_text()), path.name
    # The page is public, the API is not; /v1/models gives the bounds the form uses.
    assert httpx.get(url + "/v1/models").status_code == 401
    limits = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["limits"]
    assert limits["max_steps"] == 40 and limits["max_frames"] == 33 and limits["default_size"] == "32x32"


def test_a_wrong_key_shows_the_401_message_and_a_right_one_connects(url, browser):
    open_page(browser, url, key=None)
    wait(browser, lambda d: "needs an API key" in text(d, "auth-error"))
    field = browser.find_element(By.ID, "api-key")
    field.send_keys("not-the-key")
    browser.find_element(By.ID, "key-save").click()
    wait(browser, lambda d: "refused (401" in text(d, "key-status"))
    assert "a valid API key is required" in text(browser, "auth-error")
    assert js(browser, "return sessionStorage.getItem('avatar-serve.api-key')") == "not-the-key"
    shot(browser, "01-wrong-key-401")
    field.clear()
    field.send_keys(KEY)
    field.send_keys(Keys.ENTER)
    wait(browser, lambda d: "accepted" in text(d, "key-status"))
    assert not browser.find_element(By.ID, "auth-error").is_displayed()
    assert "Serving tiny" in text(browser, "model-info")
    # The form's bounds come from the profile.
    bounds = js(browser, "return ['v-width','v-frames','v-steps'].map(i => document.getElementById(i).max)")
    assert bounds == ["256", "33", "40"]
    assert browser.find_element(By.ID, "docs-link").get_attribute("href") == url + "/docs"
    assert browser.find_element(By.ID, "dashboard-link").get_attribute("href") == "http://127.0.0.1:8265/"


def test_every_control_is_labelled_and_reachable_by_keyboard(url, browser):
    open_page(browser, url)
    unlabelled = js(browser, """
        const name = el => (el.labels && [...el.labels].map(l => l.textContent).join(' ').trim())
            || el.getAttribute('aria-label') || (el.getAttribute('aria-labelledby') || '').split(' ')
            .map(id => document.getElementById(id)?.textContent || '').join(' ').trim() || el.textContent.trim();
        return [...document.querySelectorAll('input, textarea, select, button, a[href], progress, video')]
            .filter(el => !name(el)).map(el => el.outerHTML.slice(0, 80));""")
    assert unlabelled == []
    assert js(browser, "return [...document.images].every(i => i.alt)")
    # Tab through the page from the top: the key field, the tabs, every field of the video form
    # and its submit button are reached; Enter on the second tab opens it.
    js(browser, "document.activeElement.blur(); window.scrollTo(0, 0)")
    reached, keyboard = [], ActionChains(browser)
    for _ in range(40):
        keyboard.send_keys(Keys.TAB).perform()
        reached.append(browser.switch_to.active_element.get_attribute("id"))
    for control in ("api-key", "key-save", "tab-video", "v-image", "v-prompt", "v-width", "v-height", "v-frames",
                    "v-steps", "v-seed", "v-start", "jobs-refresh"):
        assert control in reached, (control, reached)
    browser.find_element(By.ID, "tab-video").send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("id") == "tab-talk"
    assert browser.find_element(By.ID, "panel-talk").is_displayed()
    shot(browser, "02-keyboard-talk-tab")


def test_a_video_job_runs_with_progress_timeline_and_a_playable_clip(url, browser, files):
    open_page(browser, url)
    browser.find_element(By.ID, "v-image").send_keys(str(files["portrait"]))
    wait(browser, lambda d: js(d, "const i = document.getElementById('v-preview'); return !i.hidden && i.naturalWidth"),
         message="no preview")
    for field, value in (("v-steps", "8"), ("v-seed", "5"), ("v-frames", "9")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "v-start").click()
    seen, stages = [], set()
    deadline = time.monotonic() + 120
    while text(browser, "v-stage") != "Completed":
        assert time.monotonic() < deadline, text(browser, "v-stage")
        value = int(js(browser, "return document.getElementById('v-progress').value"))
        if not seen or value != seen[-1]:
            seen.append(value)
            if len(seen) == 4:
                shot(browser, "03-video-in-progress")
        stages.add(text(browser, "v-stage"))
        time.sleep(0.05)
    seen.append(int(js(browser, "return document.getElementById('v-progress').value")))
    assert seen == sorted(seen) and len(set(seen)) >= 5 and seen[-1] == 100, seen  # the bar advanced
    assert any(re.search(r"step \d of 8 \((high|low) expert\)", s) for s in stages), stages
    # The timeline: encode (+ the first step), each expert's steps, decode; durations from the events.
    wait(browser, lambda d: int(d.find_element(By.ID, "v-timeline").get_attribute("data-segments")) >= 4)
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#v-timeline .tl-row")]
    labels = "\n".join(rows)
    assert "Encode" in labels and "High-noise expert" in labels and "Low-noise expert" in labels, rows
    assert "Decode + MP4 mux" in labels, rows
    durations = [float(re.search(r"([0-9.]+) s$", r).group(1)) for r in rows]
    # The steps after the first are in the experts' rows, in seconds: a floor the simulated steps
    # guarantee (each sleeps STEP_S), which a slow machine only raises; not a speed claim.
    assert sum(durations) >= 7 * STEP_S, rows
    # The clip: playable in the page (readyState, duration), playing, and offered for download.
    state = wait(browser, lambda d: js(d, """const v = document.getElementById('v-video');
        return v.readyState >= 3 && isFinite(v.duration) && v.duration > 0 && [v.readyState, v.duration];"""),
        message="the clip did not become playable")
    assert abs(state[1] - 9 / 16) < 0.1, state
    assert js(browser, "return document.getElementById('v-video').play().then(() => true, e => String(e))") is True
    wait(browser, lambda d: js(d, "return document.getElementById('v-video').currentTime > 0"))
    link = browser.find_element(By.ID, "v-download")
    assert link.is_displayed() and link.get_attribute("href").startswith("blob:")
    assert re.fullmatch(r"video_[0-9a-f]{32}\.mp4", link.get_attribute("download"))
    job_id = link.get_attribute("download")[:-4]
    wait(browser, lambda d: "completed" in d.find_element(By.CSS_SELECTOR, f'tr[data-id="{job_id}"]').text)
    shot(browser, "04-video-completed")
    # Opened again from the list after a reload, the finished job's timeline comes from the
    # replayed events and their server timestamps (`at`), not from when they arrived.
    open_page(browser, url)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{job_id}"] button'))
    browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{job_id}"] button').click()
    wait(browser, lambda d: int(d.find_element(By.ID, "v-timeline").get_attribute("data-segments")) >= 4)
    replayed = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#v-timeline .tl-row")]
    assert replayed == rows, (replayed, rows)
    wait(browser, lambda d: js(d, "return document.getElementById('v-video').readyState >= 3"))


def test_a_running_job_is_cancelled_from_the_page(url, browser, files):
    open_page(browser, url)
    browser.find_element(By.ID, "v-image").send_keys(str(files["portrait"]))
    steps = browser.find_element(By.ID, "v-steps")
    steps.clear()
    steps.send_keys("40")
    browser.find_element(By.ID, "v-start").click()
    wait(browser, lambda d: "step" in text(d, "v-stage"), 60, "the job did not start")
    cancel = browser.find_element(By.ID, "v-cancel")
    assert cancel.is_enabled()
    cancel.click()
    wait(browser, lambda d: text(d, "v-stage") == "Cancelled")
    job_id = js(browser, "return document.getElementById('v-job-id').textContent.split(' ')[0]")
    assert httpx.get(f"{url}/v1/videos/{job_id}", headers=AUTH).json()["status"] == "cancelled"
    wait(browser, lambda d: "cancelled" in d.find_element(By.CSS_SELECTOR, f'tr[data-id="{job_id}"]').text)
    shot(browser, "05-video-cancelled")


def test_a_bad_upload_shows_the_api_message_next_to_the_field(url, browser, files):
    open_page(browser, url)
    browser.find_element(By.ID, "v-image").send_keys(str(files["bad"]))
    browser.find_element(By.ID, "v-start").click()
    wait(browser, lambda d: text(d, "v-image-error"), message="no error next to the portrait field")
    assert "not a decodable image" in text(browser, "v-image-error")
    assert browser.find_element(By.ID, "v-image").get_attribute("aria-invalid") == "true"
    assert text(browser, "v-form-error") == ""
    shot(browser, "06-bad-upload", show="v-image-error")


def test_a_full_queue_shows_when_to_retry(url, browser, files):
    slow = {"prompt": "a woman talks", "size": "32x16", "num_frames": "5", "num_inference_steps": "40"}
    image = {"input_reference": ("p.png", files["portrait"].read_bytes(), "image/png")}
    jobs = [httpx.post(f"{url}/v1/videos", data=slow, files=image, headers=AUTH).json()["id"] for _ in range(3)]
    try:
        open_page(browser, url)
        browser.find_element(By.ID, "v-image").send_keys(str(files["portrait"]))
        browser.find_element(By.ID, "v-start").click()
        wait(browser, lambda d: text(d, "v-form-error"), message="no 429 message")
        assert "busy (429)" in text(browser, "v-form-error") and "Retry after 2 s" in text(browser, "v-form-error")
        shot(browser, "07-queue-full-429", show="v-form-error")
    finally:
        with httpx.Client(base_url=url, headers=AUTH) as client:
            for job_id in jobs:
                client.delete(f"/v1/videos/{job_id}")
            for job_id in jobs:
                wait_final(client, job_id)


def test_an_avatar_talks_and_the_answer_plays_while_it_streams(url, browser, files):
    open_page(browser, url, tab="tab-talk")
    browser.find_element(By.ID, "a-image").send_keys(str(files["portrait"]))
    browser.find_element(By.ID, "a-create").click()
    wait(browser, lambda d: d.find_element(By.ID, "a-status").get_attribute("data-status") == "ready", 120,
         "the avatar did not become ready")
    assert "is ready" in text(browser, "a-status")
    speak = browser.find_element(By.ID, "t-speak")
    assert speak.is_enabled()
    browser.find_element(By.ID, "t-audio").send_keys(str(files["speech"]))
    speak.click()
    # Playback starts while the turn is still streaming: the first frame is shown (and the element
    # is playing) before the last byte of the response has arrived.
    wait(browser, lambda d: d.find_element(By.ID, "t-metrics").get_attribute("data-playing-ms"), 120,
         "the answer did not start playing")
    if not browser.find_element(By.ID, "t-metrics").get_attribute("data-done-ms"):
        shot(browser, "08-talk-streaming", show="t-video")
    metrics = wait(browser, lambda d: js(d, "const m = document.getElementById('t-metrics').dataset;"
                                            "return m.doneMs && m.firstFrameMs && {...m}"), 120)
    first_frame, playing, done = (int(metrics[k]) for k in ("firstFrameMs", "playingMs", "doneMs"))
    assert int(metrics["firstByteMs"]) <= first_frame < done and playing < done, metrics
    assert re.fullmatch(r'video/mp4; codecs="avc1\.64[0-9a-f]{4}, mp4a\.40\.2"', metrics["mime"]), metrics
    # 4 s of speech at 25 fps: 100 frames, played to the end through Media Source Extensions.
    final = wait(browser, lambda d: js(d, """const v = document.getElementById('t-video');
        return v.ended && [v.duration, v.currentTime, v.error && v.error.message];"""), message="did not play to the end")
    assert abs(final[0] - 4.0) < 0.2 and final[2] is None, final
    assert text(browser, "t-first-frame").endswith(" s") and not text(browser, "t-form-error")
    shot(browser, "09-talk-done", show="t-video")


def test_speech_recorded_from_the_microphone_is_answered(url, browser, files):
    """Chromium's fake microphone (a beep) through MediaRecorder: the page sends WebM/Opus."""
    open_page(browser, url, tab="tab-talk")
    # The same portrait and settings as above: the same avatar, ready at once.
    browser.find_element(By.ID, "a-image").send_keys(str(files["portrait"]))
    browser.find_element(By.ID, "a-create").click()
    wait(browser, lambda d: d.find_element(By.ID, "a-status").get_attribute("data-status") == "ready", 60)
    browser.find_element(By.ID, "t-record").click()
    wait(browser, lambda d: d.find_element(By.ID, "t-stop").is_enabled())
    time.sleep(1.5)
    browser.find_element(By.ID, "t-stop").click()
    wait(browser, lambda d: "Recorded" in text(d, "t-recorded"))
    browser.find_element(By.ID, "t-speak").click()
    try:
        wait(browser, lambda d: d.find_element(By.ID, "t-metrics").get_attribute("data-done-ms")
             or text(d, "t-audio-error") or text(d, "t-form-error"), 120)
    except TimeoutException:
        raise AssertionError(text(browser, "t-status"))
    assert not text(browser, "t-audio-error") and not text(browser, "t-form-error")
    wait(browser, lambda d: js(d, "return document.getElementById('t-video').currentTime > 0"))
    shot(browser, "10-talk-recorded", show="t-video")


EVENTS_TEXT = "return document.getElementById('l-events').textContent"


def test_a_live_session_idles_lip_syncs_the_microphone_and_is_interrupted(url, browser, files):
    """Live mode: the session opens on the avatar and its stream plays (idle); Chromium's fake
    microphone, captured by the AudioWorklet, becomes an utterance that is lip-synced and ends
    back in idle; a second one is interrupted; the session is closed from the page."""
    open_page(browser, url, tab="tab-talk")
    browser.find_element(By.ID, "a-image").send_keys(str(files["portrait"]))
    browser.find_element(By.ID, "a-create").click()
    wait(browser, lambda d: d.find_element(By.ID, "a-status").get_attribute("data-status") == "ready", 120)
    browser.find_element(By.ID, "l-start").click()
    metrics = lambda d: js(d, "return {...document.getElementById('l-metrics').dataset}")  # noqa: E731
    wait(browser, lambda d: metrics(d).get("mime"), 60, "the session did not become ready")
    assert re.fullmatch(r'video/mp4; codecs="avc1\.64[0-9a-f]{4}, mp4a\.40\.2"', metrics(browser)["mime"])
    wait(browser, lambda d: js(d, "return document.getElementById('l-video').currentTime > 0.5"), 60,
         "the idle stream did not play")
    shot(browser, "11-live-idle", show="live-card")
    talk = browser.find_element(By.ID, "l-talk")
    talk.click()
    wait(browser, lambda d: d.find_element(By.ID, "l-talk").get_attribute("aria-pressed") == "true", 20)
    time.sleep(1.5)  # speak for a while (the fake microphone's beeps), then end the utterance
    talk.click()
    try:
        got = wait(browser, lambda d: metrics(d).get("speechEnded") and metrics(d), 240)
    except TimeoutException:
        raise AssertionError(f"the utterance did not end: {metrics(browser)}, {text(browser, 'l-error')}, "
                             f"{js(browser, EVENTS_TEXT)}") from None
    assert int(got["speechStarted"]) < int(got["speechEnded"]), got
    assert not text(browser, "l-error")
    wait(browser, lambda d: metrics(d).get("lagMs"), 30, "no lag was shown")
    shot(browser, "12-live-spoken", show="live-card")
    talk.click()  # a second utterance, interrupted once it is heard
    wait(browser, lambda d: js(d, EVENTS_TEXT).count("speech_started") == 2, 240, "the second utterance was not heard")
    browser.find_element(By.ID, "l-interrupt").click()
    wait(browser, lambda d: metrics(d).get("interrupted"), 30, "the interrupt was not confirmed")
    browser.find_element(By.ID, "l-end").click()
    wait(browser, lambda d: metrics(d).get("closeCode") == "1000", 30, "the session did not close normally")
    assert js(browser, "return document.getElementById('l-video').error") is None
    shot(browser, "13-live-ended", show="live-card")
