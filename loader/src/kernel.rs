//! TODO(helper): kernel
