/* A name filter in front of llama.cpp's eval callback.
 *
 * llama.cpp asks the eval callback about every graph node (~800 per decoded token with the
 * default model). Answering each in Python costs ~1 us, about 5% of decode speed; here the names
 * are compared in C and only the nodes flashmem reads reach Python. Loaded with ctypes
 * (engine/ggml.py); without it the same filter runs in Python.
 */
#include <stdbool.h>
#include <string.h>

#define TAP_MAX_NAMES 8
#define TAP_NAME_LEN 64

typedef bool (*tap_callback)(void * tensor, bool ask, void * user_data);

struct tap_filter {
    tap_callback forward;   /* called for wanted nodes only */
    long name_offset;       /* offsetof(struct ggml_tensor, name) */
    int n_names;
    char names[TAP_MAX_NAMES][TAP_NAME_LEN];
};

bool flashmem_tap_filter(void * tensor, bool ask, void * user_data) {
    const struct tap_filter * filter = (const struct tap_filter *) user_data;
    const char * name = (const char *) tensor + filter->name_offset;
    for (int i = 0; i < filter->n_names; i++) {
        if (strncmp(name, filter->names[i], TAP_NAME_LEN) == 0) {
            return filter->forward(tensor, ask, NULL);
        }
    }
    return !ask; /* not wanted; after compute, keep going */
}
