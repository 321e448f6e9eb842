"""The default input of ``cemcurate build`` when no RAW folder is given.

In order: the folder named by ``$CEM_DATA``; the project's real-data folder
``../shared/data`` (relative to the working directory or to the checkout); otherwise a
small public sample (30 ISBI-2012 ssTEM sections, Cardona et al. 2010, as redistributed
in the zhixuhao/unet repository under MIT) downloaded once into the user's cache and
checked against pinned SHA-256 digests.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from cemcurate.common.atomic import atomic_path, file_sha256

_PACKAGE_DATA = Path(__file__).parent / "data"
SAMPLE_URL = "https://raw.githubusercontent.com/zhixuhao/unet/909ae9b5fefd8a55900e24a771b073b1d4ef70ff/data/membrane/train/image/{index}.png"
SAMPLE_SHA256 = [
    "12c0ed6f42fc09f512abf6b354f217c950e4c8223b57a0315449b62a14556523",  # 0.png
    "2cfc7ee635a6f85d5faf5c82a71d3a37bf5af4784b554964e3e07193e3ee2166",  # 1.png
    "fe60d8d4f93102666a23a18d718b4b59fab8e616987d11c5072f4a87fac7301f",  # 2.png
    "636d16cbb02f99dda4c9fb6db98dfba066142afa981ffdcfaf54453982e8250c",  # 3.png
    "991fb3a8e4abc73da1d6159ca28fa4397f0a8351f30a8ba3669c86414d2ce239",  # 4.png
    "7e9d9fb787664336d6f2cd68b23986f04527e7f8f494410983b4d70c6de1de3b",  # 5.png
    "7c0a87933ffc72f4ff02f5996d9c3f69fe9a0b5277507415743ad8afb5e5d308",  # 6.png
    "19f2c25716107d41008c83ba8a814ae47a090e00dea766dde38dce1f00899270",  # 7.png
    "a8979e4abd1a10af9ca75e614d97875659adbd8ee3a68eba483bf556cfe3023d",  # 8.png
    "730ebf435ab0f6e625d342552ad03736799fd660d0c6af744674c61a46aa082a",  # 9.png
    "7c3717bcd48c4b7e5c878d7f0b809b8687a4e6fac471f3863de320a82ee72b8a",  # 10.png
    "dd7857b25ca1417f87c282750e22c50947f75e81fa032d4e0c96b902c9dc9757",  # 11.png
    "9f8eff9239bb764d51524a998387a7babcff9f62161804651b030b81aabd5ab8",  # 12.png
    "377e5cdbcd7f0ac7336f482fc7ead7446887863f26769b3841fe98aadca77dad",  # 13.png
    "f50d2d77acd2df564c5f0f40b1b24cd929f5944460aa4cd90c422cb5cef33a59",  # 14.png
    "3e13fdea09accc14f46fb2f3ffa1e882cdd9c53b28a6842c4c10229692c7d1a4",  # 15.png
    "ffc951c12450f94129582c16fd0d4b165c4a31469b0c42d966f07c183d3132e2",  # 16.png
    "0f4f7e8e0619e4c7d517ac68d3789a3b6248253747717eac418bb7d32bef4de3",  # 17.png
    "1bb1edd50595861743d14e1955dfa5d3c9395fb87563eca6dc81433bf9df49de",  # 18.png
    "999b55633f8d7082add72082656e9532c5c3d97203b376eb317f09ba88a5a5b7",  # 19.png
    "9153d14bfd15955fab576ea23281c4f23104b45dceed6e03e0b254607f50a1b2",  # 20.png
    "9ad07cf4f67984f17a08aa63e6d92d395ce55f5132e6ff4fa6d95d6890ea7f97",  # 21.png
    "6278609b4c42a7cb43212de0e2e2ceded758bafe0856fb56214ce658a61668e4",  # 22.png
    "9ef4e9fbc838b9791af83a36918d729a0ea2e90ebc71c4a3c4554059f9379756",  # 23.png
    "f0f917b9c3e9c96d16ea287aff9b05ecf4de88bc61d478e4aefcb64932fba70c",  # 24.png
    "e0154737e76392e8bf94fb2c0dfa5ddad4b53aeec942a0a8cdd8ba63443e6072",  # 25.png
    "d0ff11e09b0ee0c817334946e746a38ab621161d5f9c46af95c68b851f8d9a1a",  # 26.png
    "eed8e8bee1db8fe7af39b5b43ecf14282c5c33eca0959726eea06f662027eacc",  # 27.png
    "974df4b51e8905bdaabe61e80496cbf331f5c9aa9ddc2cb94113f58c2b7d2837",  # 28.png
    "d9ae868509c610a69acbf3d69cde4f36a8e344cbbc444f93c917bf7b9f3e784f",  # 29.png
]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cemcurate`` (default ``~/.cache/cemcurate``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cemcurate"


def fetch_sample(root: Path | None = None) -> Path:
    """Download the public sample once (verified by SHA-256) and return its RAW folder."""
    root = root or cache_dir() / "sample"
    folder = root / "isbi2012"
    for index, expected in enumerate(SAMPLE_SHA256):
        target = folder / f"{index}.png"
        if target.is_file() and file_sha256(target) == expected:
            continue
        url = SAMPLE_URL.format(index=index)
        try:
            with atomic_path(target) as tmp:
                with urllib.request.urlopen(url, timeout=60) as response:
                    tmp.write_bytes(response.read())
                if file_sha256(tmp) != expected:
                    raise ValueError(f"{url}: checksum mismatch (expected {expected}); the download was discarded")
        except OSError as exc:
            raise ValueError(f"cannot download the sample input from {url} ({exc}); give a RAW folder instead") from exc
    (root / "cemcurate.yaml").write_text((_PACKAGE_DATA / "sample_sources.yaml").read_text())
    return root


def default_input() -> tuple[Path, Path | None]:
    """``(raw, sidecar)`` for a build run without a RAW argument (see the module docstring)."""
    env = os.environ.get("CEM_DATA")
    if env:
        return Path(env), None if (
            Path(env) / "cemcurate.yaml"
        ).is_file() else _PACKAGE_DATA / "shared_data_sources.yaml"
    for candidate in (Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"):
        if candidate.is_dir():
            return candidate, _PACKAGE_DATA / "shared_data_sources.yaml"
    return fetch_sample(), None
