"""Launch the real DPT Lab app in this process on a free port, for the app, browser,
concurrency and bad-input tests (and bench/concurrency.py).

Offline (HF_HUB_OFFLINE=1, a private HF_HOME), a synthesized Depth-Anything-V2-S
checkpoint in a temporary weights folder, Gradio's cache in a temporary folder
(GRADIO_TEMP_DIR), short heartbeats so that closed sessions are noticed quickly. The
environment is restored by close().

    server = launch(tmp_path)                 # AppServer
    client = server.client()                  # a new gradio_client session
    server.close()

tests/conftest.py turns this into the module-scoped fixture `app_server`; a module can set
`APP_SERVER_OPTIONS = {...}` (keyword arguments of launch) to change the setup.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ENV_KEYS = ("HF_HUB_OFFLINE", "HF_HOME", "GRADIO_HEARTBEAT_INTERVAL", "GRADIO_ANALYTICS_ENABLED",
            "GRADIO_TEMP_DIR", "DPT_LAB_CACHE_MB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    url: str
    demo: object                   # gr.Blocks
    lab: object                    # dpt_lab.session.Lab
    model: str                     # the startup model's name
    tmp: Path                      # everything the server may write lives under here
    weights: Path                  # the weights folder
    gradio_tmp: Path               # GRADIO_TEMP_DIR: uploads and outputs
    _saved_env: dict = field(default_factory=dict, repr=False)

    @property
    def manager(self):
        return self.lab.manager

    def client(self, **kwargs):
        """A new gradio_client session (its own session hash, its own gr.State)."""
        from gradio_client import Client

        kwargs.setdefault("verbose", False)
        return Client(self.url, **kwargs)

    def close(self) -> None:
        try:
            self.demo.close()
        finally:
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def launch(tmp: Path, *, checkpoints: Iterable[str] = ("depth_anything_v2_vits",),
           prepare_weights: Optional[Callable[[Path], None]] = None, queue_max: int = 16,
           cache_mb: Optional[int] = None, max_models: Optional[int] = None,
           heartbeat_s: float = 0.5, offline: bool = True) -> AppServer:
    """Start the app as `python app.py` would (same queue, file limits, allowed paths, CSS),
    with the given fixture checkpoints (tests/fixtures.py stems) in a fresh weights folder.
    prepare_weights(folder) may add more files there before the app scans it. offline=False
    leaves HF_HUB_OFFLINE as the caller set it (a test with a fake Hub)."""
    from fixtures import save_fixture_checkpoint

    import app as app_module
    from dpt_lab import session as S

    tmp = Path(tmp)
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    weights = tmp / "weights"
    gradio_tmp = tmp / "gradio"
    weights.mkdir(parents=True, exist_ok=True)
    gradio_tmp.mkdir(parents=True, exist_ok=True)
    os.environ.update(GRADIO_ANALYTICS_ENABLED="False", HF_HOME=str(tmp / "hf"),
                      GRADIO_HEARTBEAT_INTERVAL=str(heartbeat_s), GRADIO_TEMP_DIR=str(gradio_tmp))
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if cache_mb is not None:
        os.environ["DPT_LAB_CACHE_MB"] = str(int(cache_mb))
    else:
        os.environ.pop("DPT_LAB_CACHE_MB", None)
    try:
        for stem in checkpoints:
            save_fixture_checkpoint(stem, weights)
        if prepare_weights is not None:
            prepare_weights(weights)
        manager = S.ModelManager(weights_dir=weights, max_models=max_models)
        demo = app_module.build_app(manager)
        demo.queue(max_size=queue_max, default_concurrency_limit=1)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                quiet=True, ssr_mode=False, max_file_size=app_module.MAX_FILE_SIZE,
                                allowed_paths=[str(app_module.ASSETS)], css=app_module.CSS, js=app_module.JS,
                                show_error=False)
        from dpt_lab.ui import quick
        quick.mount(demo)
    except BaseException:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        raise
    return AppServer(url, demo, demo.dpt_lab, manager.startup, tmp, weights, gradio_tmp, saved)
