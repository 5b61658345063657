from dicomnode.analysis import *  # noqa
from dicomnode.analysis import Instance, Series, Study, NotApplicable, sha256_file  # noqa
from dicomnode.registry import analyzer_class, available_analyzers  # noqa
