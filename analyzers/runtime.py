from dicomnode.runtime import *  # noqa
from dicomnode.runtime import providers_for  # noqa
