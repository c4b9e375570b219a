//! TODO(helper): extract
