"""Install the two detector libraries without their pinned dependencies.

ComfyUI-Manager runs this file after ``pip install -r requirements.txt``. facexlib would pull
numba and a second OpenCV build; facenet-pytorch pins an old torch that would replace the host's.
Everything they need at run time is in requirements.txt.
"""

import subprocess
import sys

PACKAGES = ["facexlib==0.3.0", "facenet-pytorch==2.6.0"]

if __name__ == "__main__":
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                           "-q", "--no-deps", *PACKAGES])
