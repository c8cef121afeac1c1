"""Demo data -> DICOM (CT-like series per volume, secondary-capture 2D images) -> upload to a DICOMweb store.

    python scripts/dicom_demo.py --out /tmp/demo_dicom --upload http://127.0.0.1:8042/dicom-web
    python scripts/dicom_demo.py --out /tmp/demo_dicom --start-orthanc /tmp/orthanc

See vlseg/dicom/demo.py for the options.
"""

import sys

from vlseg.dicom.demo import main

if __name__ == "__main__":
    sys.exit(main())
