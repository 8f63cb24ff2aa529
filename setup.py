from setuptools import find_packages, setup

from geobouncer import __version__

setup(
    name="geobouncer",
    version=__version__,
    description="PostgreSQL connection pooler and proxy on gevent, PgBouncer-compatible",
    packages=find_packages(exclude=["tests", "tests.*"]),
    python_requires=">=3.10",
    install_requires=[
        "gevent>=24",
        "psycopg2-binary>=2.9",
        "sqlparse>=0.5",
        "click>=8",
        "pyOpenSSL>=24",
        "scramp>=1.4",
        "prometheus-client>=0.20",
    ],
    extras_require={"docker": ["docker>=7"], "test": ["pytest", "psycopg[binary]", "asyncpg"]},
    entry_points={"console_scripts": ["geobouncer=geobouncer.cli:main"]},
)
