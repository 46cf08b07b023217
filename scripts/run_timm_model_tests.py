"""Run timm's own model test-suite (tests/test_models.py of the installed timm version) on our models.

timm's wheel does not ship its tests, so the matching source release is fetched once from PyPI
(``pip download``) into a cache folder. Usage: ``python scripts/run_timm_model_tests.py [-k EXPR]``.
"""
import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm


def timm_tests_dir(cache: Path) -> Path:
    """Folder holding timm's tests for the installed version, downloading the sdist if needed."""
    root = cache / f'timm-{timm.__version__}'
    if (root / 'tests' / 'test_models.py').is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
                        f'timm=={timm.__version__}', '-d', tmp], check=True, capture_output=True)
        sdist = next(Path(tmp).glob('timm-*.tar.gz'))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if '/tests/' in m.name]
            tar.extractall(cache, members=members, filter='data')
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('-k', default='emov', help='pytest -k expression selecting models (default: all EMO models)')
    parser.add_argument('--cache', type=Path, default=Path.home() / '.cache' / 'emov2')
    parser.add_argument('-n', default='0', help='pytest-xdist workers')
    args = parser.parse_args()
    root = timm_tests_dir(args.cache)
    cmd = [sys.executable, '-m', 'pytest', '-p', 'emov2', 'tests/test_models.py', '-k', args.k, '-q',
           '-p', 'no:cacheprovider', '-W', 'ignore']
    if args.n != '0':
        cmd += ['-n', args.n]
    return subprocess.run(cmd, cwd=root).returncode


if __name__ == '__main__':
    sys.exit(main())
