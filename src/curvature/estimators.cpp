#include "hesse/curvature.hpp"
