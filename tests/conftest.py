"""Shared fixtures. The suite is offline: any hub access fails fast."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Built-in backbones are built once per checkout (the recipe version is in the path).
os.environ.setdefault("REASONING_DIRECTIONS_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models are dispatch-bound: one thread is as fast and does not thrash when 2 cores are shared.
torch.set_num_threads(1)

from interp.backbone import load_backbone  # noqa: E402
from interp.prompts import format_chat_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the built-in tiny QwQ stand-in, float32, eval, frozen."""
    torch.manual_seed(0)
    return load_backbone("tiny", dtype="float32")


@pytest.fixture(scope="session")
def tiny_r1():
    return load_backbone("tiny-r1-distill", dtype="float32")


@pytest.fixture(scope="session")
def chat_prompts(tiny):
    """Chat-formatted prompts of different lengths (so batches are left-padded)."""
    _, tokenizer = tiny
    questions = [
        "What is 2+2?",
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Compute $\\dbinom{8}{4}$.",
        "Hi",
        "If $x + y = 10$ and $x - y = 2$, what is $x$?",
    ]
    return [format_chat_prompt(tokenizer, q) for q in questions]


@pytest.fixture(scope="session")
def shared_cache_dir(tmp_path_factory):
    """One activation-cache root per session (per xdist worker). Caches are keyed by everything that determines
    their content, so tests with identical settings extract once; a test that changes a cache uses its own dir."""
    return tmp_path_factory.mktemp("activations")


@pytest.fixture(scope="session")
def browser():
    """A headless chromium driven by selenium (tests/test_report_html.py); skips, saying why, where there is none."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    driver_path = shutil.which("chromedriver")
    if driver_path is None or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium/chromedriver on this machine (make test installs Debian's where apt and root allow)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
