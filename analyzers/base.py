from dicomnode.analysis import *  # noqa
from dicomnode.analysis import Instance, Series, Study, NotApplicable, sha256_file  # noqa
