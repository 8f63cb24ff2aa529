"""geobouncer's package metadata.

install_requires is what geobouncer needs to run, nothing more; the test suite's
own dependencies are the ``test`` extra (``pip install .[test]``).
requirements.txt pins every one of them to an exact version: ``pip install -r
requirements.txt`` is the reproducible set the scripts and CI install, and
``pip install -c requirements.txt .`` installs only the runtime part at those pins
(as the Dockerfile does). tests/unit/test_packaging.py keeps the three in step.
"""

from setuptools import find_packages, setup

from geobouncer import __version__

setup(
    name="geobouncer",
    version=__version__,
    description="PostgreSQL connection pooler and proxy on gevent, PgBouncer-compatible",
    license="ISC",
    packages=find_packages(exclude=["tests", "tests.*"]),
    python_requires=">=3.11",
    install_requires=[
        "click>=8",
        "cryptography>=42",  # reads TLS certificates (signature algorithm for SCRAM-PLUS)
        "gevent>=24",
        "pglast>=8",  # PostgreSQL's own parser for the read/write split
        "prometheus-client>=0.20",  # metrics_port
        "scramp>=1.4",
        "sqlparse>=0.5",  # imported always; the classifier's fallback parser
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "psycopg2-binary>=2.9",
            "psycopg[binary]>=3.1",
            "asyncpg>=0.29",
            "SQLAlchemy>=2",
            "kubernetes-validate>=1.30",
            "PyYAML>=6",
        ],
    },
    entry_points={"console_scripts": ["geobouncer=geobouncer.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: ISC License (ISCL)",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
)
