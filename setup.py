import shlex
from configparser import ConfigParser

import setuptools

# All settings live in settings.ini (read by nbdev 2.4.14 too); edit there, not here.
config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="Apache Software License 2.0",
    packages=setuptools.find_packages(include=["fraud_poc", "fraud_poc.*"]),
    include_package_data=True,
    install_requires=shlex.split(cfg.get("requirements", "")),
    extras_require={"dev": shlex.split(cfg.get("dev_requirements", ""))},
    python_requires=">=" + cfg["min_python"],
    long_description=open("README.md", encoding="utf8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
)
