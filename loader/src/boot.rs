//! TODO(helper): boot
