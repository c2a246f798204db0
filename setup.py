"""Install the PixArt-alpha research codebase as the importable package ``diffusion``."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements():
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="pixart-alpha",
    version="0.1.0",
    description="PixArt-alpha text-to-image Diffusion Transformers: training, sampling and checkpoint tools",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["diffusion", "diffusion.*"]),
    package_data={"diffusion.data": ["aspect_ratios.json"]},  # the bucket tables (SPEC section 4)
    install_requires=read_requirements(),
    # playwright drives Debian's /usr/bin/chromium in the demo's browser test (no browser download)
    extras_require={"test": ["pytest>=7.4", "playwright>=1.40"]},
)
