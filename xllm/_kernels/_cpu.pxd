# The thread count every kernel's prange uses; set from Python with xllm.set_threads().
cdef int get_num_threads() noexcept nogil
